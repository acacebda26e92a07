// The dashboard's shell: header and navigation, the router (paths under /ui/), the login gate.

import {api, isAdmin, logout, onSessionLost, session} from './api.js';
import {clear, h} from './dom.js';
import * as live from './live.js';
import * as admin from './views/admin.js';
import * as bags from './views/bags.js';
import * as errors from './views/errors.js';
import * as hosts from './views/hosts.js';
import * as loginView from './views/login.js';
import * as overview from './views/overview.js';
import * as tunnels from './views/tunnels.js';
import * as works from './views/works.js';

const ROUTES = [
  [/^\/ui\/?$/, overview.render, 'overview'],
  [/^\/ui\/works\/?$/, works.renderList, 'works'],
  [/^\/ui\/works\/([^/]+)\/?$/, works.renderOne, 'works'],
  [/^\/ui\/bags\/?$/, bags.render, 'bags'],
  [/^\/ui\/hosts\/?$/, hosts.renderList, 'hosts'],
  [/^\/ui\/hosts\/([^/]+)\/?$/, hosts.renderOne, 'hosts'],
  [/^\/ui\/tunnels\/?$/, tunnels.render, 'tunnels'],
  [/^\/ui\/admin\/users\/?$/, admin.renderUsers, 'users', true],
];

const main = document.getElementById('view');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
let cleanup = null;
let loginNote = '';
let offMode = null;

export function navigate(path, replace = false) {
  if (replace) history.replaceState({}, '', path);
  else history.pushState({}, '', path);
  route();
}

function navLinks(s, current) {
  const items = [['/ui/', 'Overview', 'overview'], ['/ui/works', 'Works', 'works'], ['/ui/bags', 'Groups', 'bags'],
    ['/ui/hosts', 'Hosts', 'hosts'], ['/ui/tunnels', 'Tunnels', 'tunnels']];
  if (isAdmin(s)) items.push(['/ui/admin/users', 'Users', 'users']);
  clear(nav, h('ul', {}, items.map(([href, text, key]) => h('li', {},
    h('a', {href, 'data-link': true, 'aria-current': key === current ? 'page' : null}, text)))));
}

function header(s) {
  const dot = h('span', {class: 'live-dot', id: 'live-state', title: 'live updates'});
  if (offMode) offMode();
  offMode = live.onMode((mode) => {
    dot.dataset.mode = mode;
    dot.title = mode === 'streaming' ? 'live: event stream' : mode === 'polling' ? 'live: polling' : 'not live';
    dot.setAttribute('aria-label', dot.title);
  });
  clear(who, dot, h('span', {class: 'user'}, s.login), h('span', {class: 'level'}, s.level.replace('_USER', '').toLowerCase()),
    h('button', {type: 'button', class: 'link-button', id: 'logout', onclick: () => {
      logout();
      live.stop();
      loginNote = 'You are logged out.';
      navigate('/ui/login');
    }}, 'Log out'));
}

async function route() {
  if (cleanup) { try { cleanup(); } catch (exc) { console.error(exc); } cleanup = null; }
  const path = location.pathname;
  const s = session.get();
  if (!s || path.startsWith('/ui/login')) {
    live.stop();
    clear(nav);
    clear(who);
    document.body.classList.add('anonymous');
    const next = path.startsWith('/ui/login') ? (new URLSearchParams(location.search).get('next') || '/ui/') : path + location.search;
    document.title = 'Log in — xwhep';
    cleanup = loginView.render(main, {next, note: loginNote, navigate, onLogin: () => { loginNote = ''; live.start(); }});
    return;
  }
  document.body.classList.remove('anonymous');
  header(s);
  for (const [re, render, key, adminOnly] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    navLinks(s, key);
    if (adminOnly && !isAdmin(s)) { cleanup = errors.renderRefused(main); return; }
    const ctx = {session: s, navigate, onChange: live.onChange, api};
    clear(main, h('p', {class: 'loading'}, 'Loading…'));
    try {
      cleanup = await render(main, m.slice(1).map(decodeURIComponent), ctx) || null;
    } catch (exc) {
      cleanup = errors.renderError(main, exc);
    }
    main.focus({preventScroll: true});
    return;
  }
  navLinks(s, '');
  cleanup = errors.renderNotFound(main);
}

document.addEventListener('click', (ev) => {
  const a = ev.target.closest && ev.target.closest('a[data-link]');
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/ui/')) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener('popstate', route);
onSessionLost((message) => {
  live.stop();
  loginNote = `Your session ended (${message}). Log in again.`;
  navigate(`/ui/login?next=${encodeURIComponent(location.pathname + location.search)}`, true);
});

if (session.get()) live.start();
route();
