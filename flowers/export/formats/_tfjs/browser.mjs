// Opens the demo page of a TF.js export in headless Chromium, picks a photo, waits for the top-5:
//
//     node browser.mjs URL PHOTO SCREENSHOT.png [TIMEOUT_S]
//
// URL serves a tfjs/ folder of an export (http://127.0.0.1:PORT/index.html?backend=wasm). Prints
// the page's result as one JSON line ({"image", "top", "probabilities", "backend", "ms"}) and saves
// a screenshot. The browser: $CHROME, else chromium or google-chrome on the PATH.
import fs from 'node:fs';
import path from 'node:path';
import {execFileSync} from 'node:child_process';

import {require} from './modules.mjs';

function findChrome() {
  if (process.env.CHROME) return process.env.CHROME;
  for (const name of ['chromium', 'chromium-browser', 'google-chrome']) {
    try {
      return execFileSync('which', [name], {encoding: 'utf8'}).trim();
    } catch { /* not this one */ }
  }
  throw new Error('no Chromium found: install it (Debian: apt-get install chromium) or set CHROME');
}

async function main() {
  const [url, photo, screenshot, timeoutText] = process.argv.slice(2);
  if (!url || !photo || !screenshot) throw new Error('usage: node browser.mjs URL PHOTO SCREENSHOT [TIMEOUT_S]');
  const timeout = 1000 * Number(timeoutText || 120);
  const puppeteer = require('puppeteer-core');
  const browser = await puppeteer.launch({
    executablePath: findChrome(), headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({width: 900, height: 900});
    const messages = [];
    page.on('console', message => messages.push(message.text()));
    page.on('pageerror', error => messages.push(String(error)));
    await page.goto(url, {waitUntil: 'load', timeout});
    await page.waitForFunction(() => document.body.dataset.ready || document.body.dataset.error, {timeout});
    const input = await page.$('#file');
    await input.uploadFile(path.resolve(photo));
    await page.waitForFunction(() => document.body.dataset.result || document.body.dataset.error, {timeout});
    const [result, error] = await page.evaluate(() => [document.body.dataset.result, document.body.dataset.error]);
    fs.mkdirSync(path.dirname(path.resolve(screenshot)), {recursive: true});
    await page.screenshot({path: screenshot, fullPage: true});
    if (error) throw new Error(`the page says: ${error} (console: ${messages.join(' | ')})`);
    process.stdout.write(result + '\n');
  } finally {
    await browser.close();
  }
}

main().catch(error => {
  console.error(String(error.message || error).split('\n')[0]);
  process.exit(1);
});
