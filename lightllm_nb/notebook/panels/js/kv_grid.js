// KV pool grid: one square per cell (a run of pages), coloured by owner, shaded by fill.
// Python sends {kind: "grid"} messages carrying only the cells that changed, and `rows`: per owner
// row, whose it is ("mine" with its request id, "other": another user's, anonymous) and its tokens.
const FREE = -3, CACHED = -2, SHARED = -1;
const OTHER_HUE = 28;  // every other user's request in one colour: they stay anonymous
const LEGEND_NAMED = 12;

function ownerColor(owner, fill, rows) {
  if (owner === FREE) return "#eef0f3";
  if (owner === CACHED) return "#9aa8b8";
  if (owner === SHARED) return "#7b61c9";
  const light = 62 - 22 * (fill / 255);   // fuller cells are darker
  const held = rows && rows[owner];
  if (held && held.who === "other") return `hsl(${OTHER_HUE}, 25%, ${light + 8}%)`;
  return `hsl(${(owner * 137.508) % 360}, 68%, ${light}%)`;
}

function holderText(held, row, pageSize) {
  if (!held) return `request in row ${row}`;
  const tokens = held.tokens === null ? `${held.pages * pageSize}` : `${held.tokens}`;
  const pages = `${held.pages} page${held.pages > 1 ? "s" : ""} of its own`;
  if (held.who === "mine") return `your request ${held.request}: ${tokens} tokens in KV, ${pages}`;
  if (held.who === "other") return `another user's request: ${tokens} tokens in KV, ${pages}`;
  return `request in row ${row}: ${pages}`;  // a trace without holders: rows only
}

function typed(buffer, Type) {
  const b = buffer.buffer ? buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength) : buffer;
  return new Type(b);
}

function legendItem(color, label) {
  const item = document.createElement("span");
  item.innerHTML = `<i style="display:inline-block;width:10px;height:10px;background:${color};margin:0 4px 0 10px;border:1px solid #ccc"></i>${label}`;
  return item;
}

export default {
  render({ model, el }) {
    const title = panelFrame(el, "KV cache");
    const info = document.createElement("div");
    info.className = "lnb-kv-info";
    const canvas = makeCanvas(0, 0, "lnb-kv-grid");
    canvas.style.margin = "4px 0";
    const tip = document.createElement("div");
    tip.style.minHeight = "1.3em";
    tip.style.color = "#555";
    tip.textContent = "hover a cell for its pages";
    const legend = document.createElement("div");
    legend.className = "lnb-kv-legend";
    const fixedLegend = [legendItem(ownerColor(SHARED, 0), "prefix cache, in use"),
                         legendItem(ownerColor(CACHED, 0), "prefix cache, reclaimable"),
                         legendItem(ownerColor(FREE, 0), "free")];
    el.append(title, info, canvas, tip, legend);

    function drawLegend() {
      const mine = [], others = { n: 0, tokens: 0 }, unknown = [];
      for (const [row, held] of Object.entries(meta.rows || {})) {
        if (held.who === "mine") mine.push([Number(row), held]);
        else if (held.who === "other") { others.n += 1; others.tokens += held.tokens || 0; }
        else unknown.push(Number(row));
      }
      const items = mine.slice(0, LEGEND_NAMED).map(([row, held]) =>
        legendItem(ownerColor(row, 160, meta.rows), `${held.request} (${held.tokens} tokens)`));
      if (mine.length > LEGEND_NAMED) items.push(legendItem("transparent", `+${mine.length - LEGEND_NAMED} more of yours`));
      if (others.n) items.push(legendItem(`hsl(${OTHER_HUE}, 25%, 60%)`,
        `another user's request${others.n > 1 ? "s" : ""} (${others.n}, ${others.tokens} tokens)`));
      if (unknown.length) items.push(legendItem("hsl(200,68%,50%)", "a request's pages (one colour per row)"));
      legend.replaceChildren(...items, ...fixedLegend);
    }

    let owners = new Int32Array(0), fills = new Uint8Array(0), meta = null, whoSeen = "";
    const cellPx = () => Math.max(3, Math.min(14, Math.floor(560 / meta.cols)));

    function drawCell(ctx, i, px) {
      const x = (i % meta.cols) * px, y = Math.floor(i / meta.cols) * px;
      ctx.fillStyle = ownerColor(owners[i], fills[i], meta.rows);
      ctx.fillRect(x, y, px - 1, px - 1);
    }
    function drawAll() {
      const px = cellPx();
      canvas.width = meta.cols * px;
      canvas.height = Math.ceil(owners.length / meta.cols) * px;
      const ctx = canvas.getContext("2d");
      for (let i = 0; i < owners.length; i++) drawCell(ctx, i, px);
    }

    function onMessage(msg, buffers) {
      if (msg.kind !== "grid") return;
      info.textContent = msg.info;
      if (!msg.cells) return;  // an event without the page map: only the line above
      const idx = typed(buffers[0], Int32Array), own = typed(buffers[1], Int32Array), fil = typed(buffers[2], Uint8Array);
      if (msg.full) {
        owners = new Int32Array(msg.cells).fill(FREE);
        fills = new Uint8Array(msg.cells);
      } else if (!meta) {
        model.send({ kind: "hello" });  // a patch before we know the layout: ask for everything
        return;
      }
      meta = msg;
      for (let k = 0; k < idx.length; k++) { owners[idx[k]] = own[k]; fills[idx[k]] = fil[k]; }
      // A row's colour depends on whose it is: when a row changes hands, unchanged cells repaint too.
      const who = Object.entries(msg.rows || {}).map(([row, held]) => `${row}:${held.who}`).join(",");
      drawLegend();
      if (msg.full || who !== whoSeen) { whoSeen = who; drawAll(); }
      else { const ctx = canvas.getContext("2d"), px = cellPx(); for (let k = 0; k < idx.length; k++) drawCell(ctx, idx[k], px); }
      canvas.dataset.step = msg.step;
      canvas.dataset.used = msg.used;
    }
    model.on("msg:custom", onMessage);

    canvas.addEventListener("mousemove", (e) => {
      if (!meta) return;
      const px = cellPx(), r = canvas.getBoundingClientRect();
      const i = Math.floor((e.clientY - r.top) / px) * meta.cols + Math.floor((e.clientX - r.left) / px);
      if (i < 0 || i >= owners.length) return;
      const first = i * meta.pages_per_cell, last = Math.min(first + meta.pages_per_cell, meta.pages) - 1;
      const pages = first === last ? `page ${first}` : `pages ${first}-${last}`;
      const used = Math.round(100 * fills[i] / 255);
      const o = owners[i];
      const who = o === FREE ? "free" : o === CACHED ? "prefix cache (reclaimable)" : o === SHARED ? "prefix cache, shared by running requests"
        : holderText(meta.rows[o], o, meta.page_size);
      tip.textContent = `${pages} (${meta.page_size} token${meta.page_size > 1 ? "s" : ""}/page), ${used}% in use: ${who}`;
    });
    model.send({ kind: "hello" });
    return () => model.off("msg:custom", onMessage);
  },
};
