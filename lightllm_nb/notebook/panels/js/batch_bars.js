// Tokens per step, one bar per step, one segment per request: prefill chunks warm, decodes cool.
function segColor(phase, k) {
  const light = 42 + (k % 4) * 9;
  return phase === "prefill" ? `hsl(28, 85%, ${light}%)` : `hsl(212, 70%, ${light}%)`;
}

export default {
  render({ model, el }) {
    const title = panelFrame(el, "Batch");
    const canvas = makeCanvas(560, 150, "lnb-batch");
    const tip = document.createElement("div");
    tip.style.minHeight = "1.3em"; tip.style.color = "#555";
    tip.innerHTML = `<span style="color:${segColor("prefill", 1)}">&#9632;</span> prefill chunk &nbsp; <span style="color:${segColor("decode", 1)}">&#9632;</span> decode &nbsp; (one segment per request; hover for details)`;
    el.append(title, canvas, tip);
    let steps = [];

    function draw() {
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      const keep = model.get("steps_shown");
      const shown = steps.slice(-keep);
      const totals = shown.map((s) => s.rows.reduce((a, r) => a + r.tokens, 0));
      const top = Math.max(1, ...totals);
      const w = canvas.width / keep, h = canvas.height - 14;
      shown.forEach((s, i) => {
        let y = h;
        s.rows.forEach((r, k) => {
          const dh = (r.tokens / top) * (h - 4);
          ctx.fillStyle = segColor(r.phase, k);
          ctx.fillRect(i * w + 1, y - dh, Math.max(1, w - 2), dh);
          y -= dh;
        });
      });
      ctx.fillStyle = "#333";
      ctx.fillText(`${top} tokens`, 2, 10);
      if (shown.length) ctx.fillText(`steps ${shown[0].step}-${shown[shown.length - 1].step}`, 2, canvas.height - 2);
      title.textContent = `Batch: tokens per step (last ${keep} steps)` + (shown.length ? `; last step: ${shown[shown.length - 1].rows.length} request(s)` : "");
      canvas.dataset.steps = shown.length;
    }
    function onMessage(msg) {
      if (msg.kind !== "items") return;
      steps = msg.reset ? msg.items : steps.concat(msg.items);
      steps = steps.slice(-model.get("steps_shown"));
      draw();
    }
    model.on("msg:custom", onMessage);
    canvas.addEventListener("mousemove", (e) => {
      const keep = model.get("steps_shown"), shown = steps.slice(-keep);
      const r = canvas.getBoundingClientRect();
      const s = shown[Math.floor((e.clientX - r.left) / (canvas.width / keep))];
      if (!s) return;
      const parts = s.rows.map((row) => `${row.request} ${row.phase} ${row.tokens}`).join(", ");
      tip.textContent = `step ${s.step}: ${parts || "idle"}`;
    });
    draw();
    model.send({ kind: "hello" });
    return () => model.off("msg:custom", onMessage);
  },
};
