// @ts-check
// The test page (page/app.mjs, bundled by esbuild) served on loopback, and how Chromium runs.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { build } from 'esbuild';

export const CHROMIUM = process.env.BACKSTREAM_CHROMIUM ?? '/usr/bin/chromium';
export const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Serve the page and its bundled script on a free loopback port. */
export async function servePage() {
  const bundled = await build({
    entryPoints: [new URL('../page/app.mjs', import.meta.url).pathname],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    write: false,
    logLevel: 'warning',
  });
  const script = bundled.outputFiles[0].text;
  const html = await readFile(new URL('../page/index.html', import.meta.url), 'utf8');
  const server = createServer((request, response) => {
    const path = new URL(request.url ?? '/', 'http://x').pathname;
    if (path === '/app.js') {
      response.writeHead(200, { 'content-type': 'text/javascript' }).end(script);
    } else if (path === '/') {
      response.writeHead(200, { 'content-type': 'text/html' }).end(html);
    } else {
      response.writeHead(404).end();
    }
  });
  // The server lets the auth cookie in only from a listed Origin: the test names this port.
  const port = Number(process.env.BACKSTREAM_PAGE_PORT ?? 0);
  await new Promise(resolve => server.listen(port, '127.0.0.1', () => resolve(undefined)));
  const address = server.address();
  assert.ok(address && typeof address === 'object');
  return { server, origin: `http://127.0.0.1:${address.port}` };
}
