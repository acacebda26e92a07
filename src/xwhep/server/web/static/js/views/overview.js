// Overview: tiles, works by status over time, throughput, groups' progress. Refreshed on every live change.

import {stackedChart} from '../charts.js';
import {FINAL, STATUS_ORDER, card, clear, h, link, num, progressBar} from '../dom.js';

const WINDOWS = [[900, 10, '15 min'], [3600, 30, '1 h'], [6 * 3600, 180, '6 h'], [86400, 720, '24 h']];

export async function render(root, params, ctx) {
  document.title = 'Overview — xwhep';
  let win = WINDOWS[0];
  const tiles = h('div', {class: 'tiles', id: 'tiles'});
  const statusEl = h('div', {class: 'chart', id: 'chart-status'});
  const thruEl = h('div', {class: 'chart', id: 'chart-throughput'});
  const thruNote = h('p', {class: 'chart-note', id: 'throughput-note'});
  const bagsEl = h('div', {id: 'bags'});
  const picker = h('div', {class: 'segmented', role: 'group', 'aria-label': 'time window'},
    WINDOWS.map((w) => h('button', {type: 'button', 'aria-pressed': String(w === win), onclick: (ev) => {
      win = w;
      for (const b of picker.children) b.setAttribute('aria-pressed', String(b === ev.currentTarget));
      refresh();
    }}, w[2])));
  clear(root,
    h('div', {class: 'page-head'}, h('h1', {}, 'Overview'), picker),
    tiles,
    h('div', {class: 'grid-2'},
      card('Works by status', statusEl),
      card('Throughput', thruNote, thruEl)),
    card('Groups and sessions', bagsEl));
  const byStatus = stackedChart(statusEl, [...STATUS_ORDER], {yLabel: 'works'});
  const thru = stackedChart(thruEl, ['COMPLETED', 'FAILED', 'ERROR'], {yLabel: 'finished', bars: true});

  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const [sum, hist] = await Promise.all([ctx.api('/stats'),
        ctx.api('/stats/history', {query: {window: win[0], step: win[1]}})]);
      renderTiles(tiles, sum);
      byStatus.update(hist.times, hist.status);
      thru.update(hist.times, hist.finished);
      const perBucket = hist.finished.COMPLETED || [];
      const lastMin = Math.max(1, Math.round(60 / hist.step));
      const recent = perBucket.slice(-lastMin - 1, -1).reduce((a, b) => a + b, 0);
      const total = Object.values(hist.finished).flat().reduce((a, b) => a + b, 0);
      thruNote.textContent = `${num(recent)} completed in the last minute · ${num(total)} finished in ${win[2]}`;
      renderBags(bagsEl, sum.bags);
    } finally {
      busy = false;
    }
  }
  await refresh();
  const off = ctx.onChange(refresh);
  return () => { off(); byStatus.destroy(); thru.destroy(); };
}

function tile(label, value, cls, sub) {
  return h('div', {class: `tile ${cls || ''}`}, h('span', {class: 'tile-label'}, label),
    h('span', {class: 'tile-value'}, value), sub ? h('span', {class: 'tile-sub'}, sub) : null);
}

function renderTiles(el, sum) {
  const w = sum.works;
  const failed = (w.ERROR || 0) + (w.FAILED || 0);
  const waiting = (w.PENDING || 0) + (w.UNAVAILABLE || 0);
  clear(el,
    tile('Pending', num(waiting), 'st-pending', w.UNAVAILABLE ? `${num(w.UNAVAILABLE)} waiting for data` : 'ready to run'),
    tile('Running', num((w.RUNNING || 0) + (w.DATAREQUEST || 0)), 'st-running',
      w.DATAREQUEST ? `${num(w.DATAREQUEST)} uploading` : 'on workers now'),
    tile('Completed', num(w.COMPLETED || 0), 'st-completed', `of ${num(sum.total)} works`),
    tile('Failed', num(failed), 'st-error', failed ? 'error or wall clock' : 'none'),
    tile('Hosts alive', `${num(sum.hosts.alive)} / ${num(sum.hosts.registered)}`, 'hosts',
      `${num(sum.hosts.cores_alive)} cores`));
}

export function renderBags(el, bags) {
  if (!bags.length) {
    clear(el, h('p', {class: 'empty'}, 'No groups or sessions yet. Submit works with a group to follow them here.'));
    return;
  }
  clear(el, h('ul', {class: 'bag-list'}, bags.map((b) => {
    const done = [...FINAL].reduce((a, st) => a + (b.works[st] || 0), 0);
    const pct = b.total ? Math.floor((100 * done) / b.total) : 0;
    const name = b.label || `${b.kind} ${b.uid.slice(0, 8)}`;
    return h('li', {class: 'bag', dataset: {uid: b.uid}},
      h('div', {class: 'bag-head'},
        link(`/ui/works?${b.kind}=${encodeURIComponent(b.uid)}`, name),
        h('span', {class: 'kind'}, b.kind),
        h('span', {class: 'bag-count', dataset: {done, total: b.total}},
          `${num(b.works.COMPLETED || 0)} / ${num(b.total)} completed`, h('span', {class: 'pct'}, ` · ${pct}%`))),
      progressBar(b.works, b.total),
      h('div', {class: 'bag-legend'}, STATUS_ORDER.filter((st) => b.works[st]).map((st) =>
        h('span', {class: `legend-item st-${st.toLowerCase()}`}, `${st.toLowerCase()} ${num(b.works[st])}`))));
  })));
}
