/* crosslayer feature browser. Plain JavaScript, no dependencies. Data arrive as script files calling
   window.__chunk(key, data), so every page also works from file:// (where fetch of local files is blocked). */
"use strict";
(function () {
  const CL = (window.CL = { timing: {} });
  const chunks = {};
  const waiting = {};

  window.__chunk = function (key, data) {
    chunks[key] = data;
    (waiting[key] || []).forEach((w) => w.resolve(data));
    delete waiting[key];
  };

  function load(key) {
    if (key in chunks) return Promise.resolve(chunks[key]);
    return new Promise((resolve, reject) => {
      const first = !(key in waiting);
      (waiting[key] = waiting[key] || []).push({ resolve, reject });
      if (!first) return;
      const s = document.createElement("script");
      s.src = "data/" + key + ".js";
      s.onerror = () => {
        (waiting[key] || []).forEach((w) => w.reject(new Error("cannot load data/" + key + ".js")));
        delete waiting[key];
      };
      document.head.appendChild(s);
    });
  }
  CL.load = load;

  // ------------------------------------------------------------------ helpers
  const params = new URLSearchParams(location.search);
  const $ = (sel, root) => (root || document).querySelector(sel);
  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function showTok(t) {
    return esc(t).replace(/\n/g, '<span class="nl">↵</span>\n').replace(/\t/g, "→");
  }
  function pct(x) {
    if (x === 0) return "0";
    if (x < 1e-4) return (100 * x).toExponential(1) + "%";
    return (100 * x).toFixed(x < 0.001 ? 3 : x < 0.1 ? 2 : 1) + "%";
  }
  function num(x, d) {
    if (x == null) return "–";
    return Math.abs(x) >= 1000 ? x.toFixed(0) : Number(x).toPrecision(d || 3);
  }
  function fhref(d, f) { return "feature.html?d=" + encodeURIComponent(d) + "&f=" + f; }
  function label(meta, id, lab) { return lab ? "#" + id + " <span class=muted>" + esc(lab) + "</span>" : "#" + id; }
  function badges(flag) {
    return flag === 1 ? '<span class="badge dead">dead</span>' : flag === 2 ? '<span class="badge dense">dense</span>' : "";
  }
  function fail(err) {
    $("#main").innerHTML = '<p class="error">' + esc(err.message || err) + "</p>";
    document.body.dataset.ready = "error";
  }
  function ready() {
    CL.timing.ready = performance.now();
    document.body.dataset.ready = "1";
  }

  function nav(site, current) {
    $("#nav").innerHTML = site.dictionaries
      .map((d) => '<a href="dict.html?d=' + encodeURIComponent(d.name) + '"' + (d.name === current ? ' class="on"' : "") + ">" + esc(d.name) + "</a>")
      .join("");
  }
  function dictMeta(site, name) {
    const m = site.dictionaries.find((d) => d.name === name);
    if (!m) throw new Error("no dictionary named " + name + " in this site");
    return m;
  }
  function feature(meta, f) {
    const c = Math.floor(f / meta.feature_chunk);
    const key = meta.name + "/feat-" + String(c).padStart(4, "0");
    return load(key).then((part) => {
      if (!(String(f) in part)) throw new Error("feature " + f + " is not in " + meta.name + " (0.." + (meta.n_features - 1) + ")");
      return part[String(f)];
    });
  }

  // ------------------------------------------------------------------ charts (inline SVG)
  function profileChart(meta, d, dots) {
    const L = meta.layers.length, W = 420, H = 150, pad = 28, bw = (W - pad - 8) / L;
    let s = '<svg class="chart profile" viewBox="0 0 ' + W + " " + H + '" role="img" aria-label="decoder-norm profile">';
    s += '<line class="axis" x1="' + pad + '" y1="' + (H - 22) + '" x2="' + W + '" y2="' + (H - 22) + '"/>';
    s += '<text x="0" y="12">1.0</text><text x="0" y="' + (H - 24) + '">0</text>';
    const peakIdx = meta.layers.indexOf(d.peak);
    d.profile.forEach((r, i) => {
      const h = Math.max(0, r) * (H - 40), x = pad + i * bw + 2;
      s += '<rect class="bar' + (i === peakIdx ? " peak" : "") + '" x="' + x.toFixed(1) + '" y="' + (H - 22 - h).toFixed(1) +
        '" width="' + (bw - 4).toFixed(1) + '" height="' + h.toFixed(1) + '"><title>layer ' + meta.layers[i] + ": " + r.toFixed(3) + "</title></rect>";
      if (L <= 32 || i % Math.ceil(L / 16) === 0) s += '<text x="' + (x + bw / 2 - 4).toFixed(1) + '" y="' + (H - 8) + '">' + meta.layers[i] + "</text>";
    });
    (dots || []).forEach((c, i) => {
      if (c == null) return;
      const x = pad + i * bw + bw / 2, y = H - 22 - Math.max(0, c) * (H - 40);
      s += '<circle class="dot" cx="' + x.toFixed(1) + '" cy="' + y.toFixed(1) + '" r="4"><title>best SAE cosine at layer ' + meta.layers[i] + ": " + c.toFixed(2) + "</title></circle>";
    });
    return s + "</svg>";
  }
  function histChart(meta, d) {
    const n = d.hist.length, W = 420, H = 150, pad = 8, bw = (W - 2 * pad) / n;
    const top = Math.max(1, ...d.hist), lo = meta.hist_range[0], hi = meta.hist_range[1];
    let s = '<svg class="chart hist" viewBox="0 0 ' + W + " " + H + '" role="img" aria-label="activation histogram">';
    s += '<line class="axis" x1="0" y1="' + (H - 22) + '" x2="' + W + '" y2="' + (H - 22) + '"/>';
    d.hist.forEach((c, i) => {
      const h = (c / top) * (H - 40), x = pad + i * bw;
      const a = lo + ((hi - lo) * i) / n, b = lo + ((hi - lo) * (i + 1)) / n;
      if (c) s += '<rect class="hbar" x="' + x.toFixed(1) + '" y="' + (H - 22 - h).toFixed(1) + '" width="' + (bw - 1).toFixed(1) + '" height="' + h.toFixed(1) +
        '"><title>[' + num(Math.pow(10, a)) + ", " + num(Math.pow(10, b)) + "): " + c + "</title></rect>";
    });
    for (let e = Math.ceil(lo); e <= hi; e++) {
      const x = pad + ((e - lo) / (hi - lo)) * (W - 2 * pad);
      s += '<text x="' + Math.min(W - 30, x).toFixed(1) + '" y="' + (H - 6) + '">1e' + e + "</text>";
    }
    return s + "</svg>";
  }

  // ------------------------------------------------------------------ examples
  function exampleHTML(e, scale) {
    const toks = e.t.map((t, i) => {
      const v = e.v[i];
      const a = v == null || v <= 0 ? 0 : Math.min(1, v / scale);
      const style = a > 0 ? ' style="background: rgba(var(--act),' + (0.12 + 0.78 * a).toFixed(2) + ')"' : "";
      const title = v == null ? "not stored" : "activation " + v;
      return '<span class="t' + (i === e.f ? " focus" : "") + '"' + style + ' title="' + title + '">' + showTok(t) + "</span>";
    });
    return '<div class="ex"><div class="val">' + num(e.a) + "<i>" + esc(e.l) + '</i></div><div class="ctx">' + toks.join("") + "</div></div>";
  }
  function examplesHTML(d, limitTop) {
    const scale = d.max > 0 ? d.max : 1;
    const top = d.examples.filter((e) => e.k === 0).slice(0, limitTop || 1e9);
    const quant = d.examples.filter((e) => e.k === 1);
    let s = '<div class="examples top-examples">' + (top.length ? top.map((e) => exampleHTML(e, scale)).join("") : '<p class="muted">never fires on the held-out store</p>') + "</div>";
    if (limitTop) return s;
    const bands = [...new Set(quant.map((e) => e.b))].sort((a, b) => b - a);
    if (bands.length) {
      s += '<h2 style="margin-top:16px">Quantile examples</h2><div class="examples quantile-examples">';
      bands.forEach((b) => {
        s += '<div class="band">band ' + (b + 1) + " of " + bands.length + (b === bands.length - 1 ? " (strongest)" : b === 0 ? " (weakest)" : "") + "</div>";
        s += quant.filter((e) => e.b === b).map((e) => exampleHTML(e, scale)).join("");
      });
      s += "</div>";
    }
    return s;
  }
  function logitsHTML(d) {
    if (!d.logits.length) return '<p class="muted">no layer written above the profile threshold</p>';
    const rows = (list, cls) => list.map(([t, v]) => '<tr><td class="' + cls + '">' + showTok(t) + '</td><td class="v">' + (v > 0 ? "+" : "") + v.toFixed(2) + "</td></tr>").join("");
    const cards = d.logits.slice().reverse().map((l) =>
      '<div class="layercard"><h3>layer ' + l.layer + (l === d.logits[d.logits.length - 1] ? ' <span class="muted small">last written</span>' : "") +
      '</h3><div class="grid2"><table>' + rows(l.up, "up") + "</table><table>" + rows(l.down, "down") + "</table></div></div>");
    return '<div class="logits grid3">' + cards.join("") + "</div>";
  }
  function chip(item, tau) {
    return '<a class="chip' + (item.cos > tau ? " strong" : "") + '" href="' + fhref(item.d, item.f) + '">' + esc(item.d) + " #" + item.f +
      (item.lab ? " " + esc(item.lab) : "") + ' <span class="cos">cos ' + item.cos.toFixed(2) + "</span></a>";
  }
  function linksHTML(meta, d) {
    const tau = meta.link_tau;
    let s = "";
    if (d.matches.length) {
      s += '<div class="card links-card"><h2>Matched per-layer latents</h2><p class="muted small">At each layer this feature writes, the latents of ' +
        esc(meta.linked.join(", ")) + " whose decoder is most similar (cosine; highlighted above " + tau + ").</p><table class=links>" +
        d.matches.map((m) => "<tr><td>layer " + m.layer + '</td><td><div class="chips">' + m.items.map((i) => chip(i, tau)).join("") + "</div></td></tr>").join("") +
        '</table><p><a class="btn" href="compare.html?d=' + encodeURIComponent(meta.name) + "&f=" + d.id + '">Compare side by side →</a></p></div>';
    }
    if (d.chain.length) {
      const chain = d.chain.slice().sort((a, b) => a.layer - b.layer).map((c) => ({ d: meta.name, f: c.f, cos: c.cos, lab: c.lab }));
      s += '<div class="card chain-card"><h2>Chain across layers</h2><p class="muted small">The latents of the neighbouring layers this latent is matched to (Hungarian matching of decoders; a link above ' +
        tau + " continues the chain).</p><div class=chips>" + chain.map((i) => chip(i, tau)).join("") + "</div></div>";
    }
    if (d.absorbed.length) {
      s += '<div class="card absorbed-card"><h2>Absorbed by</h2><p class="muted small">Multi-layer features whose decoder at this layer is closest to this latent.</p><div class=chips>' +
        d.absorbed.map((i) => chip(i, tau)).join("") + "</div></div>";
    }
    return s;
  }

  // ------------------------------------------------------------------ pages
  function pageIndex(site) {
    nav(site, null);
    const rows = site.dictionaries.map((d) =>
      '<tr><td><a href="dict.html?d=' + encodeURIComponent(d.name) + '">' + esc(d.name) + '</a></td><td><span class="badge kind">' + esc(d.kind) + "</span></td><td>" +
      d.n_features.toLocaleString() + "</td><td>" + d.n_live.toLocaleString() + "</td><td>" + d.n_dead.toLocaleString() + "</td><td>" + d.n_dense.toLocaleString() +
      "</td><td>" + d.layers[0] + "–" + d.layers[d.layers.length - 1] + " (" + d.layers.length + ")</td><td>" + esc(d.hooks[0].replace(/^blocks\.\d+\./, "")) + "</td></tr>").join("");
    $("#main").innerHTML = "<h1>Dictionaries</h1><p class=muted>Model " + esc(site.model) + "; statistics over " + site.n_rows.toLocaleString() +
      " held-out tokens (" + esc(site.store) + "); built " + esc(site.created) + ".</p>" +
      '<div class="card landing"><table><tr><th>dictionary</th><th>kind</th><th>features</th><th>live</th><th>dead</th><th>dense</th><th>layers</th><th>hook</th></tr>' + rows + "</table></div>" +
      '<p class="muted small">Open a dictionary for its sortable index; a feature page shows its decoder-norm profile, histogram, examples, logit effects and the features of the other dictionaries it matches.</p>';
    ready();
  }

  const COLS = [
    { key: 0, name: "feature", cls: "col-id" },
    { key: 1, name: "density", cls: "col-num", num: true },
    { key: 2, name: "max act", cls: "col-num", num: true },
    { key: 3, name: "peak", cls: "col-small", num: true },
    { key: 4, name: "span", cls: "col-small", num: true },
    { key: 5, name: "output tokens", cls: "col-tok" },
    { key: 6, name: "activating tokens", cls: "col-tok" },
    { key: 7, name: "top example", cls: "" },
  ];

  function pageDict(site) {
    const meta = dictMeta(site, params.get("d") || site.dictionaries[0].name);
    nav(site, meta.name);
    const keys = [];
    for (let c = 0; c < meta.index_chunks; c++) keys.push(meta.name + "/index-" + String(c).padStart(3, "0"));
    return Promise.all(keys.map(load)).then((parts) => {
      const all = [].concat(...parts);
      all.forEach((r) => { r.search = (r[5] + " " + r[6] + " " + r[7] + " " + r[9]).toLowerCase(); });
      const state = { sort: 1, asc: false, q: "", dead: false, page: 0, size: 200 };
      CL.rows = all;
      $("#main").innerHTML =
        '<div class="titlebar"><h1>' + esc(meta.name) + '</h1><span class="badge kind">' + esc(meta.kind) + '</span><span class="muted">' + meta.n_features.toLocaleString() +
        " features · " + meta.n_live.toLocaleString() + " live · " + meta.n_dead.toLocaleString() + " dead · " + meta.n_dense.toLocaleString() + " dense (&gt; " + pct(meta.dense_threshold) +
        ") · layers " + meta.layers[0] + "–" + meta.layers[meta.layers.length - 1] + "</span></div>" +
        '<div class="controls"><input type="search" id="q" placeholder="Search output tokens, activating tokens or example text (or a feature number)…">' +
        '<label><input type="checkbox" id="dead"> show dead</label><span id="count" class="muted"></span>' +
        '<span class="pager"><button class="btn" id="prev">‹ prev</button><button class="btn" id="next">next ›</button></span></div>' +
        '<div class="tableframe"><table class="features"><colgroup>' + COLS.map((c) => '<col class="' + c.cls + '">').join("") + "</colgroup><thead><tr>" +
        COLS.map((c) => '<th data-col="' + c.key + '" class="' + (c.num ? "num" : "") + '">' + c.name + "</th>").join("") + "</tr></thead><tbody></tbody></table></div>";
      let view = all;
      function filter() {
        const q = state.q.trim().toLowerCase(), asNum = /^#?\d+$/.test(q) ? Number(q.replace("#", "")) : null;
        view = all.filter((r) => (state.dead || r[8] !== 1) && (!q || r.search.includes(q) || r[0] === asNum));
        sort();
      }
      function sort() {
        const t0 = performance.now(), k = state.sort, sign = state.asc ? 1 : -1;
        view.sort((a, b) => (a[k] < b[k] ? -sign : a[k] > b[k] ? sign : a[0] - b[0]));
        CL.timing.sort = performance.now() - t0;
        state.page = 0;
        render();
      }
      function render() {
        const t0 = performance.now(), start = state.page * state.size, part = view.slice(start, start + state.size);
        $("tbody").innerHTML = part.map((r) =>
          "<tr" + (r[8] === 1 ? ' class="dead"' : "") + ' data-id="' + r[0] + '"><td><a href="' + fhref(meta.name, r[0]) + '">' + label(meta, r[0], r[9]) + "</a>" + badges(r[8]) +
          '</td><td class="num">' + pct(r[1]) + '</td><td class="num">' + num(r[2]) + '</td><td class="num">' + r[3] + '</td><td class="num">' + r[4] +
          '</td><td class="tok" title="' + esc(r[5]) + '">' + showTok(r[5]) + '</td><td class="tok" title="' + esc(r[6]) + '">' + showTok(r[6]) +
          '</td><td class="tok" title="' + esc(r[7]) + '">' + showTok(r[7]) + "</td></tr>").join("");
        $("#count").textContent = view.length ? "showing " + (start + 1) + "–" + (start + part.length) + " of " + view.length.toLocaleString() : "no features match";
        $("#count").dataset.total = view.length;
        $("#prev").disabled = state.page === 0;
        $("#next").disabled = start + state.size >= view.length;
        document.querySelectorAll("th").forEach((th) => {
          th.classList.toggle("sorted", Number(th.dataset.col) === state.sort);
          th.classList.toggle("asc", Number(th.dataset.col) === state.sort && state.asc);
        });
        CL.timing.render = performance.now() - t0;
      }
      document.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
        const col = Number(th.dataset.col);
        state.asc = state.sort === col ? !state.asc : col === 0 || col === 3;
        state.sort = col;
        sort();
      }));
      let timer = null;
      $("#q").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => { state.q = e.target.value; filter(); }, 120); });
      $("#dead").addEventListener("change", (e) => { state.dead = e.target.checked; filter(); });
      $("#prev").addEventListener("click", () => { state.page--; render(); });
      $("#next").addEventListener("click", () => { state.page++; render(); });
      CL.search = (q) => { $("#q").value = q; state.q = q; filter(); };
      filter();
      ready();
    });
  }

  function pageFeature(site) {
    const meta = dictMeta(site, params.get("d") || site.dictionaries[0].name);
    const f = Number(params.get("f") || 0);
    nav(site, meta.name);
    return feature(meta, f).then((d) => {
      document.title = "crosslayer · " + meta.name + " #" + f;
      const prev = f > 0 ? '<a class="btn" href="' + fhref(meta.name, f - 1) + '">‹ #' + (f - 1) + "</a>" : "";
      const next = f + 1 < meta.n_features ? '<a class="btn" href="' + fhref(meta.name, f + 1) + '">#' + (f + 1) + " ›</a>" : "";
      const stat = (v, k) => '<div class="stat"><b>' + v + "</b><span>" + k + "</span></div>";
      $("#main").innerHTML =
        '<div class="titlebar"><h1><a href="dict.html?d=' + encodeURIComponent(meta.name) + '">' + esc(meta.name) + "</a> · feature " + f + (d.label ? ' <span class="muted">' + esc(d.label) + "</span>" : "") +
        "</h1>" + badges(d.flag) + '<span class="pager">' + prev + next + "</span></div>" +
        '<div class="stats">' + stat(pct(d.density), "density (" + d.n_fire.toLocaleString() + " tokens)") + stat(num(d.max), "max activation") + stat(d.peak, "peak layer") +
        stat(d.span + " / " + meta.layers.length, "span (layers written)") + stat(d.entropy.toFixed(2), "profile entropy") + stat(d.drift.toFixed(2), "direction drift (cos)") + "</div>" +
        '<div class="grid2"><div class="card"><h2>Decoder-norm profile</h2>' + profileChart(meta, d) + '<p class="muted small">Decoder norm at each layer relative to its largest (darker: the peak).</p></div>' +
        '<div class="card"><h2>Activation histogram</h2>' + histChart(meta, d) + '<p class="muted small">Non-zero activations on the held-out store (log scale).</p></div></div>' +
        linksHTML(meta, d) +
        '<div class="card"><h2>Top activations</h2>' + examplesHTML(d) + "</div>" +
        '<div class="card"><h2>Logit effects</h2><p class="muted small">Tokens whose logits the decoder direction raises (green) and lowers (red) most, per layer written (direct effect through the final norm and unembedding).</p>' + logitsHTML(d) + "</div>" +
        '<div class="card" id="steer-card"><h2>Live steering</h2><div id="steer"></div></div>';
      steering(meta, d);
      ready();
    });
  }

  function pageCompare(site) {
    const meta = dictMeta(site, params.get("d") || site.dictionaries[0].name);
    const f = Number(params.get("f") || 0);
    nav(site, meta.name);
    return feature(meta, f).then((d) => {
      const linked = d.matches.filter((m) => m.items.length).map((m) => ({ layer: m.layer, best: m.items.slice().sort((a, b) => b.cos - a.cos)[0] }));
      const dots = meta.layers.map((l) => { const m = linked.find((x) => x.layer === l); return m ? m.best.cos : null; });
      return Promise.all(linked.map((m) => feature(dictMeta(site, m.best.d), m.best.f))).then((others) => {
        const right = others.map((o, i) => { const b = linked[i].best; return (
          '<div class="card sae-card"><div class="titlebar"><h2 style="margin:0">layer ' + linked[i].layer + ' · <a href="' + fhref(b.d, o.id) + '">' + esc(b.d) + " #" + o.id +
          (o.label ? " " + esc(o.label) : "") + "</a></h2>" + badges(o.flag) + '<span class="muted small">cos ' + b.cos.toFixed(2) + " · density " + pct(o.density) + " · max " + num(o.max) +
          "</span></div>" + examplesHTML(o, 3) + "</div>"); }).join("");
        $("#main").innerHTML =
          '<div class="titlebar"><h1>Compare: <a href="' + fhref(meta.name, f) + '">' + esc(meta.name) + " #" + f + "</a></h1>" + badges(d.flag) +
          '<span class="muted">its decoder-norm profile and examples beside the best-matching per-layer latent at each layer it writes</span></div>' +
          '<div class="compare"><div><div class="card"><h2>' + esc(meta.name) + " #" + f + " · profile</h2>" + profileChart(meta, d, dots) +
          '<p class="muted small">Bars: relative decoder norm per layer. Red dots: cosine of the best-matching per-layer latent at that layer.</p>' +
          '<p class="small">density ' + pct(d.density) + " · max " + num(d.max) + " · span " + d.span + "</p></div>" +
          '<div class="card"><h2>Top activations</h2>' + examplesHTML(d, 8) + "</div></div><div>" +
          (right || '<div class="card muted">No per-layer latents are linked to this feature (no single-layer dictionary with the same hooks in this site).</div>') + "</div></div>";
        ready();
      });
    });
  }

  // ------------------------------------------------------------------ live steering (only when served by `crosslayer browse --serve`)
  function steering(meta, d) {
    const box = $("#steer");
    const hint = () => { box.innerHTML = '<p class="muted">Serve this site with <code>crosslayer browse --serve --out SITE</code> to clamp this feature on a prompt of your own and see clean vs steered next-token probabilities.</p>'; };
    if (!location.protocol.startsWith("http")) return hint();
    fetch("api/info").then((r) => (r.ok ? r.json() : Promise.reject())).then((info) => {
      if (!info.dictionaries.includes(meta.name)) return hint();
      const v = d.max > 0 ? (2 * d.max).toPrecision(3) : "5";
      box.innerHTML =
        '<form class="steer" id="steer-form"><label class="wide">Prompt<textarea name="prompt" rows="2" maxlength="' + info.max_prompt_chars + '">The weather today is</textarea></label>' +
        '<label>Mode<select name="mode"><option>clamp</option><option>add</option><option>scale</option><option>ablate</option></select></label>' +
        '<label>Value<input name="value" type="number" step="any" value="' + v + '"></label>' +
        '<label>At<select name="at"><option>each</option><option>first</option><option>peak</option></select></label>' +
        '<label>Tokens<input name="tokens" type="number" min="0" max="' + info.max_new_tokens + '" value="12"></label>' +
        '<label>Seed<input name="seed" type="number" value="0"></label>' +
        '<label><button class="btn primary" type="submit">Steer</button></label></form><div class="steer-out" id="steer-out"></div>';
      $("#steer-form").addEventListener("submit", (ev) => {
        ev.preventDefault();
        const fd = new FormData(ev.target), out = $("#steer-out");
        const body = { dictionary: meta.name, feature: d.id, prompt: fd.get("prompt"), mode: fd.get("mode"), value: Number(fd.get("value")),
          at: fd.get("at"), tokens: Number(fd.get("tokens")), seed: Number(fd.get("seed")) };
        out.innerHTML = '<p class="muted">running the model…</p>';
        fetch("api/steer", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
          .then((r) => r.json().then((j) => (r.ok ? j : Promise.reject(new Error(j.error || r.statusText)))))
          .then((res) => { out.innerHTML = steerResult(res); out.dataset.done = "1"; })
          .catch((err) => { out.innerHTML = '<p class="error">' + esc(err.message) + "</p>"; out.dataset.done = "error"; });
      });
    }).catch(hint);
  }
  function steerResult(res) {
    const table = (dir) => "<table><tr><th>token</th><th>p clean</th><th>p steered</th></tr>" + res.tokens.filter((t) => t.direction === dir).map((t) =>
      '<tr class="prob"><td class="ctx">' + showTok(t.token) + '</td><td class="v">' + t.p_clean.toFixed(4) + '</td><td class="v">' + t.p_steered.toFixed(4) + "</td></tr>").join("") + "</table>";
    return '<p class="small">KL(clean‖steered) = <b>' + res.kl.toFixed(4) + "</b> · clean activation at the last token " + num(res.clean_activation) + " · edited layers " + esc(res.layers.join(", ")) +
      '</p><div class="grid2"><div><h2>Rose most</h2>' + table("up") + "</div><div><h2>Fell most</h2>" + table("down") + "</div></div>" +
      (res.clean_text != null ? '<div class="grid2" style="margin-top:12px"><div><h2>Clean generation</h2><div class="gen">' + esc(res.prompt) + "<b>" + esc(res.clean_text) +
        '</b></div></div><div><h2>Steered generation</h2><div class="gen">' + esc(res.prompt) + "<b>" + esc(res.steered_text) + "</b></div></div></div>" : "");
  }

  // ------------------------------------------------------------------ start
  const pages = { index: pageIndex, dict: pageDict, feature: pageFeature, compare: pageCompare };
  load("site").then((site) => pages[document.body.dataset.page](site)).catch(fail);
})();
