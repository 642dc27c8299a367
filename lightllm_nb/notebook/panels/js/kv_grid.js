// KV pool grid: one square per cell (a run of pages), coloured by owner, shaded by fill.
// Python sends {kind: "grid"} messages carrying only the cells that changed.
const FREE = -3, CACHED = -2, SHARED = -1;

function ownerColor(owner, fill) {
  if (owner === FREE) return "#eef0f3";
  if (owner === CACHED) return "#9aa8b8";
  if (owner === SHARED) return "#7b61c9";
  const light = 62 - 22 * (fill / 255);   // fuller cells are darker
  return `hsl(${(owner * 137.508) % 360}, 68%, ${light}%)`;
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
    legend.append(legendItem("hsl(200,68%,50%)", "a request's pages (one colour per request)"),
                  legendItem(ownerColor(SHARED, 0), "prefix cache, in use"),
                  legendItem(ownerColor(CACHED, 0), "prefix cache, reclaimable"),
                  legendItem(ownerColor(FREE, 0), "free"));
    el.append(title, info, canvas, tip, legend);

    let owners = new Int32Array(0), fills = new Uint8Array(0), meta = null;
    const cellPx = () => Math.max(3, Math.min(14, Math.floor(560 / meta.cols)));

    function drawCell(ctx, i, px) {
      const x = (i % meta.cols) * px, y = Math.floor(i / meta.cols) * px;
      ctx.fillStyle = ownerColor(owners[i], fills[i]);
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
      if (msg.full) drawAll();
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
      let who = o === FREE ? "free" : o === CACHED ? "prefix cache (reclaimable)" : o === SHARED ? "prefix cache, shared by running requests"
        : `request in row ${o}: holds ${(meta.rows[o] || 0) * meta.page_size} tokens`;
      tip.textContent = `${pages} (${meta.page_size} token${meta.page_size > 1 ? "s" : ""}/page), ${used}% in use: ${who}`;
    });
    model.send({ kind: "hello" });
    return () => model.off("msg:custom", onMessage);
  },
};
