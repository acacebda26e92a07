// Charts on uPlot (vendored: /ui/vendor/uplot-1.6.32/, MIT). Stacked areas are drawn as cumulative series, the
// tallest first, each filled down to zero: the later (lower) ones paint over the earlier. The legend shows each
// series' own value, not the cumulative one.

import {STATUS_COLOR} from './dom.js';

const uPlot = window.uPlot;

function sizeOf(el, height) {
  return {width: Math.max(280, el.clientWidth - 4), height};
}

function observe(el, chart, height) {
  const ro = new ResizeObserver(() => chart.setSize(sizeOf(el, height)));
  ro.observe(el);
  return () => { ro.disconnect(); chart.destroy(); };
}

function lighten(hex, amount) {
  const n = parseInt(hex.slice(1), 16);
  const mix = (c) => Math.round(c + (255 - c) * amount);
  const r = mix((n >> 16) & 255); const g = mix((n >> 8) & 255); const b = mix(n & 255);
  return `rgb(${r}, ${g}, ${b})`;
}

const axisStyle = {stroke: '#5b6472', grid: {stroke: '#e8ecf1', width: 1}, ticks: {stroke: '#e8ecf1', width: 1},
  font: '12px system-ui, sans-serif'};

function timeAxes(yLabel) {
  return [{...axisStyle}, {...axisStyle, label: yLabel, labelFont: '12px system-ui, sans-serif', size: 56,
    values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? v.toLocaleString('en-US') : ''))}];
}

// keys: series names bottom-up; colours per name. update(times, {name: values}).
export function stackedChart(el, keys, {height = 240, yLabel = 'works', bars = false, colors = STATUS_COLOR} = {}) {
  let raw = {};
  let shown = [];
  const opts = {
    ...sizeOf(el, height),
    padding: [8, 12, 0, 0],
    cursor: {points: {show: false}},
    legend: {live: true},
    scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(1, max * 1.08)]}},
    axes: timeAxes(yLabel),
    series: [{}],
  };
  const chart = new uPlot(opts, [[]], el);
  let built = '';

  function build(names) {
    while (chart.series.length > 1) chart.delSeries(1);
    // tallest (last cumulative) first
    [...names].reverse().forEach((name) => {
      const c = colors[name] || '#888';
      chart.addSeries({
        label: name.charAt(0) + name.slice(1).toLowerCase(),
        stroke: c, width: 1, fill: lighten(c, 0.25),
        paths: bars ? uPlot.paths.bars({size: [0.7, 40], align: 0}) : undefined,
        value: (u, v, si, i) => (i === null || i === undefined ? '—' : (raw[name]?.[i] ?? 0).toLocaleString('en-US')),
      });
    });
    built = names.join(',');
  }

  function update(times, values) {
    raw = values;
    shown = keys.filter((k) => values[k] && values[k].some((v) => v));
    if (!shown.length && keys.length) shown = [keys[0]];
    if (shown.join(',') !== built) build(shown);
    const acc = new Array(times.length).fill(0);
    const cumulative = shown.map((k) => (values[k] || acc).map((v, i) => (acc[i] += v || 0)));
    chart.setData([times, ...cumulative.reverse()]);
  }

  return {update, destroy: observe(el, chart, height)};
}

// one line (e.g. hosts alive, sampled while the page is open)
export function lineChart(el, label, color, {height = 160} = {}) {
  const chart = new uPlot({
    ...sizeOf(el, height),
    padding: [8, 12, 0, 0],
    cursor: {points: {show: false}},
    scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(1, max + 1)]}},
    axes: timeAxes(label),
    series: [{}, {label, stroke: color, width: 2, fill: lighten(color, 0.8)}],
  }, [[], []], el);
  return {update: (times, values) => chart.setData([times, values]), destroy: observe(el, chart, height)};
}
