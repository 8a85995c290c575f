/*
 * osmvec drift page.
 *
 * Polls GET /v1/drift and every page of GET /v1/tiles (docs/observability.md) every
 * REFRESH_MS and shows:
 *   - a header with model version, replication sequence, lag, drifted share;
 *   - a Leaflet map with one rectangle per stored tile, coloured by drift;
 *   - two hand-drawn canvas charts over /v1/drift's `series`.
 *
 * No base map, no CDN, no build step. Tiles are drawn with Leaflet's canvas
 * renderer and updated incrementally (only new, removed or restyled tiles are
 * touched on a refresh), so ~30,000 tiles stay cheap.
 *
 * Test hooks, set after every tile-layer render:
 *   document.body.dataset.tilesShown = <rectangles on the map>
 *   document.body.dataset.ready      = "1"
 *   #tile-count                      = same number, as text
 * and document.body.dataset.status = "loading" | "ok" | "error".
 */
(function () {
  'use strict';

  var REFRESH_MS = 5000;
  var FETCH_TIMEOUT_MS = 15000;
  var DEFAULT_THRESHOLD = 0.05; // only used until /v1/drift answers once
  var NULL_COLOR = '#9e9e9e';   // drift null: first embedding of the tile

  // ---------------------------------------------------------------- helpers

  function $(id) { return document.getElementById(id); }

  function setText(id, text, title) {
    var el = $(id);
    if (!el) return;
    el.textContent = text;
    if (title !== undefined) el.title = title;
  }

  function isNum(v) { return typeof v === 'number' && isFinite(v); }

  function pad2(n) { return (n < 10 ? '0' : '') + n; }

  function fmtClock(date, withSeconds) {
    var s = pad2(date.getHours()) + ':' + pad2(date.getMinutes());
    return withSeconds ? s + ':' + pad2(date.getSeconds()) : s;
  }

  function fmtDuration(sec) {
    if (!isNum(sec)) return '–';
    var neg = sec < 0;
    var s = Math.abs(sec);
    var out;
    if (s < 60) out = s.toFixed(s < 10 ? 1 : 0) + ' s';
    else if (s < 3600) out = Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s';
    else if (s < 86400) out = Math.floor(s / 3600) + ' h ' + Math.round((s % 3600) / 60) + ' min';
    else out = (s / 86400).toFixed(1) + ' d';
    return (neg ? '−' : '') + out;
  }

  function fmtPct(v, digits) {
    return isNum(v) ? (v * 100).toFixed(digits === undefined ? 1 : digits) + ' %' : '–';
  }

  function fmtDrift(v) {
    if (v === null || v === undefined) return 'none (first embedding)';
    return isNum(v) ? v.toFixed(4) : String(v);
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
    });
  }

  // fetch() a JSON document; rejects with a readable message on HTTP errors
  // (using the API's {"error": "..."} body when there is one), bad JSON,
  // network failures and timeouts.
  // Every page of GET /v1/tiles (paginated: ?after=z/x/y&limit=N, `next`
  // names the next page), as one { tiles: [...] } answer.
  function getAllTiles() {
    var rows = [];
    function page(after) {
      var path = '/v1/tiles?limit=10000' + (after ? '&after=' + encodeURIComponent(after) : '');
      return getJSON(path).then(function (d) {
        if (!d || !Array.isArray(d.tiles)) return d;
        rows = rows.concat(d.tiles);
        return d.next ? page(d.next) : { tiles: rows, total: d.total };
      });
    }
    return page(null);
  }

  function getJSON(path) {
    var ctrl = typeof AbortController === 'function' ? new AbortController() : null;
    var timer = ctrl ? setTimeout(function () { ctrl.abort(); }, FETCH_TIMEOUT_MS) : null;
    return fetch(path, {
      cache: 'no-store',
      headers: { Accept: 'application/json' },
      signal: ctrl ? ctrl.signal : undefined
    }).then(function (resp) {
      return resp.text().then(function (body) {
        if (!resp.ok) {
          var detail = body;
          try {
            var j = JSON.parse(body);
            if (j && typeof j.error === 'string') detail = j.error;
          } catch (e) { /* not JSON: show the raw body */ }
          detail = String(detail || '').trim().slice(0, 300);
          throw new Error('GET ' + path + ': HTTP ' + resp.status +
            (resp.statusText ? ' ' + resp.statusText : '') + (detail ? ': ' + detail : ''));
        }
        try {
          return JSON.parse(body);
        } catch (e) {
          throw new Error('GET ' + path + ': invalid JSON: ' + e.message);
        }
      });
    }, function (err) {
      if (err && err.name === 'AbortError') {
        throw new Error('GET ' + path + ': no answer within ' + FETCH_TIMEOUT_MS / 1000 + ' s');
      }
      throw new Error('GET ' + path + ': ' + (err && err.message ? err.message : err));
    }).finally(function () {
      if (timer) clearTimeout(timer);
    });
  }

  // ----------------------------------------------------------- colour scale

  // ColorBrewer YlOrRd (sequential): light yellow at drift 0, dark red at or
  // above 2 x threshold. The threshold itself sits in the middle (orange).
  var RAMP = ['#ffffcc', '#ffeda0', '#fed976', '#feb24c', '#fd8d3c',
    '#fc4e2a', '#e31a1c', '#bd0026'].map(function (hex) {
    return [parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16)];
  });

  function rampColor(t) {
    if (!(t > 0)) t = 0;
    if (t > 1) t = 1;
    var pos = t * (RAMP.length - 1);
    var i = Math.min(Math.floor(pos), RAMP.length - 2);
    var f = pos - i;
    var a = RAMP[i], b = RAMP[i + 1];
    return 'rgb(' + Math.round(a[0] + (b[0] - a[0]) * f) + ',' +
      Math.round(a[1] + (b[1] - a[1]) * f) + ',' +
      Math.round(a[2] + (b[2] - a[2]) * f) + ')';
  }

  // Quantise to 64 steps so equal-looking tiles share one colour string and
  // restyling can be skipped when nothing visible changes.
  function driftColor(drift, threshold) {
    if (drift === null || drift === undefined || !isNum(drift)) return NULL_COLOR;
    var max = 2 * (threshold > 0 ? threshold : DEFAULT_THRESHOLD);
    return rampColor(Math.round(Math.min(drift / max, 1) * 63) / 63);
  }

  function tileStyle(color) {
    return {
      stroke: true,       // a 1 px outline in the fill colour keeps tiles that
      weight: 1,          // are smaller than a pixel at low zoom visible
      color: color,
      opacity: 0.9,
      fill: true,
      fillColor: color,
      fillOpacity: 0.8
    };
  }

  // ----------------------------------------------------- slippy-map tiles

  // Web Mercator XYZ tile -> [[south, west], [north, east]] in degrees.
  function tileBounds(z, x, y) {
    var n = Math.pow(2, z);
    function lon(xx) { return xx / n * 360 - 180; }
    function lat(yy) { return Math.atan(Math.sinh(Math.PI * (1 - 2 * yy / n))) * 180 / Math.PI; }
    return [[lat(y + 1), lon(x)], [lat(y), lon(x + 1)]];
  }

  function validTile(z, x, y) {
    if (!(Number.isInteger(z) && Number.isInteger(x) && Number.isInteger(y))) return false;
    if (z < 0 || z > 30) return false;
    var n = Math.pow(2, z);
    return x >= 0 && x < n && y >= 0 && y < n;
  }

  // ------------------------------------------------------------------- map

  var map = L.map('map', {
    preferCanvas: true,
    zoomControl: false, // added top-right below: top-left holds graticule labels
    attributionControl: true,
    worldCopyJump: false,
    minZoom: 1,
    maxZoom: 19
  }).setView([0, 0], 2);
  map.attributionControl.setPrefix(
    '<a href="https://leafletjs.com" title="Leaflet">Leaflet</a> | tiles derived from © OpenStreetMap contributors');

  L.control.zoom({ position: 'topright' }).addTo(map);
  L.control.scale({ metric: true, imperial: false, position: 'bottomleft' }).addTo(map);

  // One canvas renderer shared by all tile rectangles.
  var tileRenderer = L.canvas({ padding: 0.3, tolerance: 0 });
  var tileGroup = L.featureGroup().addTo(map);

  // key "z/x/y" -> { rect, z, x, y, drift, sequence, color }
  var tiles = new Map();
  var fittedOnce = false;
  var currentThreshold = DEFAULT_THRESHOLD;

  function tileInfoHtml(t) {
    var driftCell = (t.drift === null || t.drift === undefined) ? 'none (first embedding)' :
      escapeHtml(fmtDrift(t.drift)) + (isNum(t.drift) && t.drift > currentThreshold ? ' (above threshold ' + currentThreshold + ')' : '');
    return '<div class="tile-info"><table>' +
      '<tr><th>tile</th><td>' + t.z + '/' + t.x + '/' + t.y + '</td></tr>' +
      '<tr><th>sequence</th><td>' + escapeHtml(t.sequence) + '</td></tr>' +
      '<tr><th>drift</th><td>' + driftCell + '</td></tr>' +
      '</table></div>';
  }

  // A single tooltip and popup for the whole group (not one per rectangle):
  // Leaflet hands us the rectangle under the pointer as the source layer.
  tileGroup.bindTooltip(function (layer) {
    return layer.tileInfo ? tileInfoHtml(layer.tileInfo) : '';
  }, { sticky: true, direction: 'top', opacity: 0.95 });
  tileGroup.bindPopup(function (layer) {
    return layer.tileInfo ? tileInfoHtml(layer.tileInfo) : '';
  });

  // Apply one /v1/tiles answer to the map, touching only what changed.
  function renderTiles(data, threshold) {
    var t0 = performance.now();
    if (!data || !Array.isArray(data.tiles)) {
      throw new Error('GET /v1/tiles: answer has no "tiles" array');
    }
    var thresholdChanged = threshold !== currentThreshold;
    currentThreshold = threshold;

    var seen = new Set();
    var skipped = 0;
    var rows = data.tiles;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      if (!Array.isArray(r) || r.length < 3) { skipped++; continue; }
      var z = r[0], x = r[1], y = r[2];
      var drift = r.length > 3 ? r[3] : null;
      var seq = r.length > 4 ? r[4] : null;
      if (!validTile(z, x, y)) { skipped++; continue; }
      var key = z + '/' + x + '/' + y;
      if (seen.has(key)) continue; // duplicate row: keep the first
      seen.add(key);
      var color = driftColor(drift, threshold);
      var t = tiles.get(key);
      if (t) {
        t.drift = drift;
        t.sequence = seq;
        if (t.color !== color || thresholdChanged) {
          t.color = color;
          t.rect.setStyle(tileStyle(color));
        }
      } else {
        var rect = L.rectangle(tileBounds(z, x, y), Object.assign({
          renderer: tileRenderer,
          smoothFactor: 0,        // never simplify a 4-corner ring away
          interactive: true
        }, tileStyle(color)));
        t = { rect: rect, z: z, x: x, y: y, drift: drift, sequence: seq, color: color };
        rect.tileInfo = t;
        tiles.set(key, t);
        tileGroup.addLayer(rect);
      }
    }
    // Tiles no longer in the answer (e.g. tombstoned) leave the map.
    if (tiles.size > seen.size) {
      tiles.forEach(function (t, key) {
        if (!seen.has(key)) {
          tileGroup.removeLayer(t.rect);
          tiles.delete(key);
        }
      });
    }

    if (!fittedOnce && tiles.size > 0) {
      fittedOnce = true;
      map.fitBounds(tileGroup.getBounds(), { padding: [20, 20], maxZoom: 17, animate: false });
    }

    var shown = tileGroup.getLayers().length;
    setText('tile-count', String(shown),
      isNum(data.count) && data.count !== shown ? 'API count ' + data.count + ', shown ' + shown : undefined);
    document.body.dataset.tilesShown = String(shown);
    document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
    document.body.dataset.ready = '1';
    return { shown: shown, skipped: skipped };
  }

  // ---------------------------------------------------------------- legend

  var legend = L.control({ position: 'bottomright' });
  legend.onAdd = function () {
    var div = L.DomUtil.create('div', 'legend');
    L.DomEvent.disableClickPropagation(div);
    return div;
  };
  legend.addTo(map);

  var legendThreshold = null;
  function renderLegend(threshold) {
    legendThreshold = threshold;
    var stops = [];
    for (var i = 0; i <= 10; i++) stops.push(rampColor(i / 10) + ' ' + (i * 10) + '%');
    var fmt = function (v) { return +v.toPrecision(3); };
    legend.getContainer().innerHTML =
      '<div class="title">drift (cosine distance)</div>' +
      '<div class="bar" style="background: linear-gradient(to right, ' + stops.join(', ') + ')"></div>' +
      '<div class="ticks"><span style="left:0">0</span>' +
      '<span style="left:50%">' + fmt(threshold) + ' (threshold)</span>' +
      '<span style="left:100%">≥ ' + fmt(2 * threshold) + '</span></div>' +
      '<div class="null"><span class="swatch" style="background:' + NULL_COLOR + '"></span>no drift yet (first embedding)</div>';
  }
  renderLegend(currentThreshold);

  // ------------------------------------------------------------- graticule

  // With no base map a light lat/lon grid with labels gives orientation.
  map.createPane('graticule');
  map.getPane('graticule').style.zIndex = 350; // below overlayPane (400)
  map.getPane('graticule').style.pointerEvents = 'none';
  var graticuleRenderer = L.svg({ pane: 'graticule' });
  var graticule = L.layerGroup().addTo(map);
  var GRID_STEPS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 45];

  function gridStep(span) {
    for (var i = 0; i < GRID_STEPS.length; i++) {
      if (span / GRID_STEPS[i] <= 7) return GRID_STEPS[i];
    }
    return 90;
  }

  function fmtDeg(v, step, pos, neg) {
    var digits = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
    return Math.abs(v).toFixed(digits) + '°' + (v > 0 ? pos : v < 0 ? neg : '');
  }

  function drawGraticule() {
    graticule.clearLayers();
    var b = map.getBounds();
    var south = Math.max(b.getSouth(), -85), north = Math.min(b.getNorth(), 85);
    var west = Math.max(b.getWest(), -180), east = Math.min(b.getEast(), 180);
    if (!(north > south && east > west)) return;
    var lonStep = gridStep(east - west), latStep = gridStep(north - south);
    var style = { renderer: graticuleRenderer, color: '#8da2b0', weight: 1, opacity: 0.6, interactive: false, dashArray: '2 4',
      // not clipped: this handler may run before the renderer has taken the
      // new view's bounds, and a clipped line would stop short of the edges
      noClip: true };
    var labelOpts = function (html, anchor) {
      return { icon: L.divIcon({ className: 'graticule-label', html: html, iconSize: null, iconAnchor: anchor }), interactive: false, keyboard: false };
    };
    var lo, la;
    for (lo = Math.ceil(west / lonStep) * lonStep; lo <= east; lo += lonStep) {
      graticule.addLayer(L.polyline([[south, lo], [north, lo]], style));
      graticule.addLayer(L.marker([north, lo], labelOpts(fmtDeg(lo, lonStep, 'E', 'W'), [-3, -4])));
    }
    for (la = Math.ceil(south / latStep) * latStep; la <= north; la += latStep) {
      graticule.addLayer(L.polyline([[la, west], [la, east]], style));
      graticule.addLayer(L.marker([la, west], labelOpts(fmtDeg(la, latStep, 'N', 'S'), [-4, 14])));
    }
  }
  map.on('moveend', drawGraticule);
  drawGraticule();

  // ---------------------------------------------------------------- charts

  // Nice tick values covering [min, max] (Heckbert's "nice numbers").
  function niceTicks(min, max, count) {
    if (!(max > min)) { max = min + 1; }
    var range = niceNum(max - min, false);
    var step = niceNum(range / Math.max(count - 1, 1), true);
    var lo = Math.floor(min / step) * step, hi = Math.ceil(max / step) * step;
    var ticks = [];
    for (var v = lo; v <= hi + step / 2; v += step) ticks.push(+v.toPrecision(12));
    return { min: lo, max: hi, step: step, ticks: ticks };
  }
  function niceNum(x, round) {
    var e = Math.floor(Math.log10(x)), f = x / Math.pow(10, e), nf;
    if (round) nf = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
    else nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
    return nf * Math.pow(10, e);
  }

  var TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  function timeTicks(t0, t1, maxTicks) {
    var step = TIME_STEPS[TIME_STEPS.length - 1];
    for (var i = 0; i < TIME_STEPS.length; i++) {
      if ((t1 - t0) / TIME_STEPS[i] <= maxTicks) { step = TIME_STEPS[i]; break; }
    }
    // Align to local wall-clock multiples of the step.
    var tz = new Date(t0 * 1000).getTimezoneOffset() * 60;
    var first = Math.ceil((t0 - tz) / step) * step + tz;
    var ticks = [];
    for (var t = first; t <= t1; t += step) ticks.push(t);
    return { step: step, ticks: ticks };
  }

  // Draw a line chart on a canvas.
  //   spec.series: [{ name, color, axis: 'left'|'right', points: [[t, v|null], ...] }]
  //   spec.left / spec.right: { label, fmt(v), min?, max? }
  //   spec.hlines: [{ axis, value, color, label }]
  function drawChart(canvas, spec) {
    var dpr = window.devicePixelRatio || 1;
    var w = Math.max(canvas.clientWidth, 200), h = Math.max(canvas.clientHeight, 120);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    var ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';

    var pad = { l: 58, r: spec.right ? 58 : 14, t: 20, b: 34 };
    var pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;

    var all = [];
    spec.series.forEach(function (s) {
      s.points.forEach(function (p) { if (isNum(p[0])) all.push(p[0]); });
    });
    if (!all.length) {
      ctx.fillStyle = '#656d76';
      ctx.textAlign = 'center';
      ctx.fillText('no data yet', w / 2, h / 2);
      return;
    }
    var t0 = Math.min.apply(null, all), t1 = Math.max.apply(null, all);
    if (t1 - t0 < 60) { t0 -= 30; t1 += 30; }

    function axisRange(which) {
      var ax = spec[which];
      if (!ax) return null;
      var vals = [];
      spec.series.forEach(function (s) {
        if ((s.axis || 'left') !== which) return;
        s.points.forEach(function (p) { if (isNum(p[1])) vals.push(p[1]); });
      });
      (spec.hlines || []).forEach(function (l) { if ((l.axis || 'left') === which && isNum(l.value)) vals.push(l.value); });
      var lo = isNum(ax.min) ? ax.min : (vals.length ? Math.min.apply(null, vals) : 0);
      var hi = vals.length ? Math.max.apply(null, vals) : 1;
      if (isNum(ax.max)) hi = Math.max(hi, ax.max);
      if (!(hi > lo)) hi = lo + (Math.abs(lo) || 1);
      // 5 % headroom so a maximum or a threshold line does not sit on the frame
      return niceTicks(lo, hi + (hi - lo) * 0.05, 5);
    }
    var yl = axisRange('left'), yr = axisRange('right');

    var X = function (t) { return pad.l + (t - t0) / (t1 - t0) * pw; };
    var Y = function (v, r) { return pad.t + ph - (v - r.min) / (r.max - r.min) * ph; };

    // grid + left axis
    ctx.strokeStyle = '#e5e8eb';
    ctx.lineWidth = 1;
    ctx.fillStyle = '#444c56';
    ctx.textAlign = 'right';
    yl.ticks.forEach(function (v) {
      var y = Math.round(Y(v, yl)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
      ctx.fillText(spec.left.fmt(v), pad.l - 5, y);
    });
    if (yr) {
      ctx.textAlign = 'left';
      yr.ticks.forEach(function (v) {
        ctx.fillText(spec.right.fmt(v), pad.l + pw + 5, Y(v, yr));
      });
    }
    // time axis
    var tt = timeTicks(t0, t1, Math.max(2, Math.floor(pw / 70)));
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    tt.ticks.forEach(function (t) {
      var x = Math.round(X(t)) + 0.5;
      ctx.strokeStyle = '#f0f2f4';
      ctx.beginPath(); ctx.moveTo(x, pad.t); ctx.lineTo(x, pad.t + ph); ctx.stroke();
      ctx.strokeStyle = '#8c959f';
      ctx.beginPath(); ctx.moveTo(x, pad.t + ph); ctx.lineTo(x, pad.t + ph + 4); ctx.stroke();
      ctx.fillText(fmtClock(new Date(t * 1000), tt.step < 60), x, pad.t + ph + 6);
    });
    ctx.fillStyle = '#656d76';
    ctx.fillText('time (local)', pad.l + pw / 2, pad.t + ph + 20);
    // frame
    ctx.strokeStyle = '#8c959f';
    ctx.strokeRect(pad.l + 0.5, pad.t + 0.5, pw - 1, ph - 1);
    // axis titles (rotated)
    ctx.textBaseline = 'middle';
    ctx.save();
    ctx.translate(12, pad.t + ph / 2); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = 'center'; ctx.fillStyle = '#444c56';
    ctx.fillText(spec.left.label, 0, 0);
    ctx.restore();
    if (yr) {
      ctx.save();
      ctx.translate(w - 10, pad.t + ph / 2); ctx.rotate(Math.PI / 2);
      ctx.textAlign = 'center'; ctx.fillStyle = '#444c56';
      ctx.fillText(spec.right.label, 0, 0);
      ctx.restore();
    }

    // clip the data to the plot area
    ctx.save();
    ctx.beginPath(); ctx.rect(pad.l, pad.t, pw, ph); ctx.clip();
    (spec.hlines || []).forEach(function (l) {
      var r = (l.axis || 'left') === 'right' ? yr : yl;
      var y = Y(l.value, r);
      ctx.strokeStyle = l.color; ctx.setLineDash([4, 3]); ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
      ctx.setLineDash([]);
      if (l.label) {
        ctx.fillStyle = l.color; ctx.textAlign = 'right'; ctx.textBaseline = 'bottom';
        ctx.fillText(l.label, pad.l + pw - 4, y - 2);
      }
    });
    spec.series.forEach(function (s) {
      var r = (s.axis || 'left') === 'right' ? yr : yl;
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.6;
      ctx.beginPath();
      var pen = false, n = 0, lastX = 0, lastY = 0;
      s.points.forEach(function (p) {
        if (!isNum(p[0]) || !isNum(p[1])) { pen = false; return; } // gap
        lastX = X(p[0]); lastY = Y(p[1], r); n++;
        if (pen) ctx.lineTo(lastX, lastY); else ctx.moveTo(lastX, lastY);
        pen = true;
      });
      ctx.stroke();
      if (n === 1 || s.points.length < 40) {
        // few points: mark them so single cycles are visible
        s.points.forEach(function (p) {
          if (!isNum(p[0]) || !isNum(p[1])) return;
          ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1], r), 2, 0, 2 * Math.PI); ctx.fill();
        });
      }
    });
    ctx.restore();

    // legend (top)
    var lx = pad.l;
    ctx.textAlign = 'left'; ctx.textBaseline = 'middle';
    spec.series.forEach(function (s) {
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, 6, 14, 3);
      ctx.fillStyle = '#444c56';
      var label = s.name + (spec.right ? ' (' + (s.axis === 'right' ? 'right' : 'left') + ')' : '');
      ctx.fillText(label, lx + 18, 8);
      lx += 18 + ctx.measureText(label).width + 14;
    });
  }

  function lagUnit(maxSeconds) {
    if (maxSeconds >= 2 * 3600) return { div: 3600, name: 'h' };
    if (maxSeconds >= 2 * 60) return { div: 60, name: 'min' };
    return { div: 1, name: 's' };
  }

  var lastDrift = null;

  function renderCharts(drift) {
    var series = (drift && Array.isArray(drift.series)) ? drift.series.slice() : [];
    series.sort(function (a, b) { return (a.t || 0) - (b.t || 0); });
    var lagMax = 0;
    series.forEach(function (p) { if (isNum(p.lag_seconds)) lagMax = Math.max(lagMax, p.lag_seconds); });
    var u = lagUnit(lagMax);
    var numFmt = function (v) { return +v.toPrecision(4) + ''; };
    drawChart($('chart-lag'), {
      series: [{
        name: 'replication lag', color: '#0969da', axis: 'left',
        points: series.map(function (p) { return [p.t, isNum(p.lag_seconds) ? p.lag_seconds / u.div : null]; })
      }],
      left: { label: 'lag (' + u.name + ')', fmt: numFmt, min: 0 }
    });
    var thr = drift && isNum(drift.threshold) ? drift.threshold : null;
    drawChart($('chart-drift'), {
      series: [
        { name: 'drift_mean', color: '#d1242f', axis: 'left',
          points: series.map(function (p) { return [p.t, isNum(p.drift_mean) ? p.drift_mean : null]; }) },
        { name: 'drifted_share', color: '#8250df', axis: 'right',
          points: series.map(function (p) { return [p.t, isNum(p.drifted_share) ? p.drifted_share : null]; }) }
      ],
      left: { label: 'mean cosine distance', fmt: numFmt, min: 0 },
      right: { label: 'drifted share (%)', fmt: function (v) { return +(v * 100).toPrecision(3) + ''; }, min: 0 },
      hlines: thr !== null ? [{ axis: 'left', value: thr, color: '#bc4c00', label: 'threshold ' + thr }] : []
    });
  }

  // ---------------------------------------------------------------- header

  function renderHeader(drift) {
    var series = Array.isArray(drift.series) ? drift.series : [];
    var last = null;
    series.forEach(function (p) { if (p && (!last || (p.t || 0) >= (last.t || 0))) last = p; });
    setText('model-version', drift.model_version != null ? String(drift.model_version) : '–');
    setText('sequence', last && last.sequence != null ? String(last.sequence) : '–');
    setText('lag', last ? fmtDuration(last.lag_seconds) : '–',
      last && isNum(last.t) ? 'as of cycle at ' + new Date(last.t * 1000).toISOString() : '');
    var shareTitle = 'share of the ' + (isNum(drift.updates) ? drift.updates : '?') +
      ' tile updates in the last ' + fmtDuration(drift.window_seconds) +
      ' whose drift exceeds ' + drift.threshold + (isNum(drift.drifted) ? ' (' + drift.drifted + ' tiles)' : '');
    setText('drifted-share', fmtPct(drift.drifted_share), shareTitle);

    var parts = [];
    parts.push('threshold ' + (isNum(drift.threshold) ? drift.threshold : '?'));
    parts.push('window ' + fmtDuration(drift.window_seconds));
    if (isNum(drift.updates)) parts.push(drift.updates + ' updates, ' + (isNum(drift.drifted) ? drift.drifted : '?') + ' drifted');
    if (isNum(drift.mean)) parts.push('mean ' + drift.mean.toFixed(4));
    if (isNum(drift.max)) parts.push('max ' + drift.max.toFixed(4));
    var md = drift.model_drift;
    if (md && typeof md === 'object') {
      parts.push('model drift ' + md.from + ' → ' + md.to + ' on ' + md.points + ' probes: cosine ' +
        (isNum(md.mean_cosine_distance) ? md.mean_cosine_distance.toFixed(4) : '?') + ', MMD² ' +
        (isNum(md.mmd2) ? md.mmd2.toExponential(2) : '?'));
    }
    setText('drift-summary', parts.join(' · '));
  }

  // ------------------------------------------------------------- refresh

  function setStatus(errors, note) {
    var el = $('status');
    if (errors.length) {
      el.className = 'status error';
      el.textContent = errors.join('\n') + (note ? '\n' + note : '');
      document.body.dataset.status = 'error';
    } else {
      el.className = 'status ok';
      el.textContent = note;
      document.body.dataset.status = 'ok';
    }
  }

  var refreshing = false;

  function refresh() {
    if (refreshing) return Promise.resolve();
    refreshing = true;
    var errors = [];
    return Promise.all([
      getJSON('/v1/drift').then(function (d) { return { ok: d }; }, function (e) { return { err: e }; }),
      getAllTiles().then(function (d) { return { ok: d }; }, function (e) { return { err: e }; })
    ]).then(function (res) {
      var driftRes = res[0], tilesRes = res[1];
      if (driftRes.err) {
        errors.push(driftRes.err.message);
      } else {
        lastDrift = driftRes.ok || {};
        try {
          renderHeader(lastDrift);
          renderCharts(lastDrift);
        } catch (e) {
          errors.push('drawing /v1/drift failed: ' + e.message);
        }
      }
      var threshold = lastDrift && isNum(lastDrift.threshold) && lastDrift.threshold > 0 ? lastDrift.threshold : currentThreshold;
      if (threshold !== legendThreshold) renderLegend(threshold);
      var note = '';
      if (tilesRes.err) {
        errors.push(tilesRes.err.message);
      } else {
        try {
          var r = renderTiles(tilesRes.ok, threshold);
          if (r.skipped) errors.push('/v1/tiles: ' + r.skipped + ' malformed tile row(s) skipped');
          note = r.shown + ' tiles shown';
        } catch (e) {
          errors.push(e.message);
        }
      }
      var now = new Date();
      setText('updated', fmtClock(now, true), now.toISOString());
      setStatus(errors, (errors.length ? 'last attempt ' : 'refreshed ') + fmtClock(now, true) +
        (note ? ' · ' + note : '') + ' · every ' + REFRESH_MS / 1000 + ' s');
    }).catch(function (e) {
      setStatus(['page error: ' + (e && e.message ? e.message : e)], '');
    }).finally(function () {
      refreshing = false;
    });
  }

  // Keep the map and the charts in step with the layout: the panels change
  // size with the window and when the status line grows or shrinks.
  var resizeTimer = null;
  function onResize() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      map.invalidateSize({ pan: false });
      drawGraticule();
      if (lastDrift) renderCharts(lastDrift);
    }, 100);
  }
  if (typeof ResizeObserver === 'function') {
    var ro = new ResizeObserver(onResize);
    ro.observe($('map'));
    ro.observe($('chart-lag'));
    ro.observe($('chart-drift'));
  } else {
    window.addEventListener('resize', onResize);
  }

  // Surface uncaught errors instead of failing silently.
  window.addEventListener('error', function (ev) {
    setStatus(['page error: ' + (ev.message || ev.error)], '');
  });

  // Poll: the next refresh starts REFRESH_MS after the previous one ended, so
  // slow answers never pile up.
  function loop() {
    refresh().then(function () { setTimeout(loop, REFRESH_MS); });
  }
  loop();
})();
