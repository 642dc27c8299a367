// Small line charts with the latest value: throughput, time to first token, queue length.
export default {
  render({ model, el }) {
    panelFrame(el, "");
    el.style.display = "flex"; el.style.gap = "18px";
    const charts = {};
    for (const [key, label] of model.get("series")) {
      const box = document.createElement("div");
      const head = document.createElement("div");
      const canvas = makeCanvas(170, 36, "lnb-spark");
      box.append(head, canvas);
      el.append(box);
      charts[key] = { head, canvas, label };
    }
    function draw(values) {
      for (const [key, c] of Object.entries(charts)) {
        const v = values[key] || [], ctx = c.canvas.getContext("2d");
        ctx.clearRect(0, 0, c.canvas.width, c.canvas.height);
        const last = v.length ? v[v.length - 1] : null;
        c.head.textContent = `${c.label}: ${last === null ? "-" : (+last.toFixed(last < 10 ? 3 : 1))}`;
        if (v.length < 2) continue;
        const top = Math.max(...v, 1e-9);
        ctx.strokeStyle = "#1f6fb3"; ctx.beginPath();
        v.forEach((y, i) => {
          const px = (i / (v.length - 1)) * (c.canvas.width - 2) + 1, py = c.canvas.height - 2 - (y / top) * (c.canvas.height - 4);
          i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
        });
        ctx.stroke();
      }
    }
    const onMessage = (msg) => { if (msg.kind === "series") draw(msg.values); };
    model.on("msg:custom", onMessage);
    model.send({ kind: "hello" });
    return () => model.off("msg:custom", onMessage);
  },
};
