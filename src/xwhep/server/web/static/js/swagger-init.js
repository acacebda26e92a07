// Swagger UI for /docs, from the files served by this server (no CDN, no inline script).
const el = document.getElementById('swagger-ui');
window.ui = window.SwaggerUIBundle({
  url: el.dataset.openapi,
  dom_id: '#swagger-ui',
  presets: [window.SwaggerUIBundle.presets.apis, window.SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: 'BaseLayout',
  deepLinking: true,
  showExtensions: true,
});
