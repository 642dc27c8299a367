// Scheduler decisions: a timeline (one lane per kind) and a filterable table with reasons.
const KINDS = ["admit", "defer", "preempt", "resume", "finish", "reject", "prefix_hit", "evict"];
const COLORS = { admit: "#2e9d57", defer: "#e0a100", preempt: "#d9434d", resume: "#1f8fb3", finish: "#6b6b6b",
                 reject: "#8c1d40", prefix_hit: "#7b61c9", evict: "#a86b32" };

function esc(s) { return String(s ?? "").replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c])); }

export default {
  render({ model, el }) {
    const title = panelFrame(el, "Scheduler decisions");
    const canvas = makeCanvas(560, 12 * KINDS.length + 4, "lnb-timeline");
    const controls = document.createElement("div");
    const kind = document.createElement("select");
    kind.innerHTML = `<option value="">all kinds</option>` + KINDS.map((k) => `<option>${k}</option>`).join("");
    const text = document.createElement("input");
    text.placeholder = "filter: request, user or reason";
    text.style.marginLeft = "6px";
    controls.append(kind, text);
    const tableBox = document.createElement("div");
    tableBox.style.maxHeight = "180px"; tableBox.style.overflowY = "auto";
    const table = document.createElement("table");
    table.className = "lnb-decisions";
    table.style.borderCollapse = "collapse";
    tableBox.append(table);
    el.append(title, canvas, controls, tableBox);
    let entries = [];

    function drawTimeline() {
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      if (!entries.length) return;
      const first = entries[0].step, last = entries[entries.length - 1].step, span = Math.max(1, last - first);
      const x0 = 70;
      KINDS.forEach((k, lane) => { ctx.fillStyle = "#555"; ctx.fillText(k, 2, 12 * lane + 11); });
      for (const d of entries) {
        ctx.fillStyle = COLORS[d.kind] || "#000";
        ctx.fillRect(x0 + ((d.step - first) / span) * (canvas.width - x0 - 4), 12 * KINDS.indexOf(d.kind) + 3, 3, 8);
      }
    }
    function drawTable() {
      const k = kind.value, t = text.value.toLowerCase();
      const rows = entries.filter((d) => (!k || d.kind === k) &&
        (!t || `${d.request} ${d.user} ${d.reason}`.toLowerCase().includes(t))).slice(-200).reverse();
      table.innerHTML = `<tr><th>step</th><th>kind</th><th>request</th><th>reason</th><th>numbers</th></tr>` +
        rows.map((d) => `<tr><td>${d.step}</td><td style="color:${COLORS[d.kind]}">${d.kind}</td><td>${esc(d.request)}</td>` +
          `<td>${esc(d.reason)}</td><td>${esc(Object.entries(d.numbers || {}).map(([a, b]) => `${a}=${typeof b === "number" ? +b.toFixed(3) : b}`).join(" "))}</td></tr>`).join("");
      table.querySelectorAll("td,th").forEach((c) => { c.style.padding = "1px 6px"; c.style.textAlign = "left"; c.style.verticalAlign = "top"; });
      table.dataset.rows = rows.length;
    }
    function onMessage(msg) {
      if (msg.kind !== "items") return;
      entries = (msg.reset ? msg.items : entries.concat(msg.items)).slice(-model.get("limit"));
      drawTimeline(); drawTable();
    }
    model.on("msg:custom", onMessage);
    kind.addEventListener("change", drawTable);
    text.addEventListener("input", drawTable);
    model.send({ kind: "hello" });
    return () => model.off("msg:custom", onMessage);
  },
};
