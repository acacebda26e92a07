import {clear, h, link} from '../dom.js';

function page(root, title, text) {
  document.title = `${title} — xwhep`;
  clear(root, h('section', {class: 'card notice', role: 'alert'}, h('h1', {}, title), h('p', {}, text),
    h('p', {}, link('/ui/', 'Back to the overview'))));
  return null;
}

export function renderNotFound(root, what = 'page') {
  return page(root, 'Not found or not allowed',
    `There is no such ${what}, or you are not allowed to see it. Nothing about it is shown.`);
}

export function renderRefused(root) {
  return page(root, 'Not allowed', 'This page is for administrators.');
}

export function renderError(root, exc) {
  if (exc && (exc.status === 404 || exc.status === 403)) return renderNotFound(root);
  if (exc && exc.status === 401) return null;  // the login page takes over
  return page(root, 'Something went wrong', exc && exc.message ? exc.message : String(exc));
}
