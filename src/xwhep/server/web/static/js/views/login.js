import {login} from '../api.js';
import {clear, h} from '../dom.js';

export function render(root, {next, note, navigate, onLogin}) {
  const error = h('p', {class: 'form-error', id: 'login-error', role: 'alert', 'aria-live': 'assertive'});
  const info = note ? h('p', {class: 'form-note', role: 'status'}, note) : null;
  const user = h('input', {id: 'login', name: 'login', autocomplete: 'username', required: true, autofocus: true});
  const pass = h('input', {id: 'password', name: 'password', type: 'password', autocomplete: 'current-password',
    required: true});
  const button = h('button', {type: 'submit', class: 'primary'}, 'Log in');
  const form = h('form', {class: 'login-form', novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    error.textContent = '';
    if (!user.value || !pass.value) {
      error.textContent = 'Enter your login and your password.';
      (user.value ? pass : user).focus();
      return;
    }
    button.disabled = true;
    button.textContent = 'Logging in…';
    try {
      await login(user.value.trim(), pass.value);
      onLogin();
      navigate(next && next.startsWith('/ui/') && !next.startsWith('/ui/login') ? next : '/ui/', true);
    } catch (exc) {
      error.textContent = exc.status === 401 ? 'Wrong login or password.'
        : exc.status === 429 ? `Too many failed attempts: ${exc.message}.` : `Login failed: ${exc.message}`;
      pass.value = '';
      pass.focus();
      button.disabled = false;
      button.textContent = 'Log in';
    }
  }},
  h('label', {for: 'login'}, 'Login'), user,
  h('label', {for: 'password'}, 'Password'), pass,
  error, button);
  clear(root, h('section', {class: 'login-card'},
    h('div', {class: 'login-brand'}, h('img', {src: '/ui/img/favicon.svg', alt: '', width: 40, height: 40}),
      h('div', {}, h('h1', {}, 'xwhep'), h('p', {class: 'muted'}, 'Desktop grid dashboard'))),
    info, form));
  return null;
}
