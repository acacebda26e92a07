// DOM building and formatting helpers. Text always goes in as text nodes (never innerHTML): whatever a work's
// label or a job's log says, it cannot become markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const STATUS_ORDER = ['COMPLETED', 'ERROR', 'FAILED', 'LOST', 'ABORTED', 'DATAREQUEST', 'REPLICATING',
  'RUNNING', 'PENDING', 'UNAVAILABLE'];
export const STATUS_COLOR = {
  UNAVAILABLE: '#b08d2e', PENDING: '#8193ab', RUNNING: '#2f6fde', DATAREQUEST: '#7d4fd8', REPLICATING: '#1596b4',
  COMPLETED: '#1f9d55', ERROR: '#d43c3c', FAILED: '#e8772e', ABORTED: '#a67c1a', LOST: '#a3294f',
};
export const FINAL = new Set(['COMPLETED', 'ERROR', 'FAILED']);

export function statusPill(status) {
  return h('span', {class: `pill st-${String(status).toLowerCase()}`}, status);
}

export function num(n) {
  return (n ?? 0).toLocaleString('en-US');
}

export function shortUid(uid) {
  return uid ? String(uid).slice(0, 8) : '';
}

export function parseTime(t) {
  if (t === null || t === undefined) return null;
  return typeof t === 'number' ? t * 1000 : Date.parse(t);
}

export function ago(t) {
  const ms = parseTime(t);
  if (ms === null || Number.isNaN(ms)) return '—';
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 0) return 'just now';
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function when(t) {
  const ms = parseTime(t);
  if (ms === null) return h('span', {class: 'muted'}, '—');
  const d = new Date(ms);
  return h('time', {datetime: d.toISOString(), title: d.toLocaleString()}, ago(t));
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '—';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function between(a, b) {
  const x = parseTime(a);
  const y = b ? parseTime(b) : Date.now();
  return x === null ? null : (y - x) / 1000;
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

// A progress bar in status segments (done first), with a text equivalent for screen readers.
export function progressBar(counts, total) {
  const done = (counts.COMPLETED || 0);
  const bad = (counts.ERROR || 0) + (counts.FAILED || 0);
  const label = `${num(done)} of ${num(total)} completed` + (bad ? `, ${num(bad)} failed` : '');
  const bar = h('div', {class: 'progress', role: 'img', 'aria-label': label, title: label});
  for (const st of STATUS_ORDER) {
    const n = counts[st] || 0;
    if (!n || !total) continue;
    const seg = h('span', {class: `seg st-${st.toLowerCase()}`});
    seg.style.width = `${(100 * n) / total}%`;
    bar.append(seg);
  }
  return bar;
}

export function table(columns, rows, {empty = 'Nothing here yet.', caption} = {}) {
  if (!rows.length) return h('p', {class: 'empty'}, empty);
  return h('div', {class: 'table-wrap'},
    h('table', {},
      caption ? h('caption', {class: 'sr-only'}, caption) : null,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', {scope: 'col', class: c.cls}, c.title)))),
      h('tbody', {}, rows.map((r) => h('tr', {}, columns.map((c) => h('td', {class: c.cls}, c.cell(r))))))));
}

export function card(title, ...body) {
  return h('section', {class: 'card'}, title ? h('h2', {}, title) : null, ...body);
}

export function link(href, ...text) {
  return h('a', {href, 'data-link': true}, ...text);
}

export function tags(items) {
  if (!items || !items.length) return h('span', {class: 'muted'}, 'none');
  return h('span', {class: 'tags'}, items.map((t) => h('span', {class: 'tag'}, t)));
}
