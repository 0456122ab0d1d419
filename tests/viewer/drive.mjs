// Browser driver of tests/test_viewer.py: opens the dicom-covid demo's OHIF viewer in the
// system Chromium with playwright-core (no browser download) and records what it shows.
//
//   node tests/viewer/drive.mjs config.json
//
// config.json: {viewerUrl, studyInstanceUid, accession, srDescription, scDescription,
//               outDir, chromium, timeoutMs}
//
// Steps: study list (click the study: its series are listed) -> viewer on the study (series in
// the study browser) -> double-click the SR (wait for the outline and the text box) ->
// double-click the heat map. Screenshots go to outDir (study-list.png, sr-outline.png,
// heatmap.png; failure.png when a step fails). The observations are written to
// outDir/result.json and printed as one "RESULT {...}" line; the Python test asserts on them.
// Every wait polls the page; nothing sleeps for a fixed time.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const timeout = cfg.timeoutMs ?? 90000;
const result = { steps: {}, consoleErrors: [], pageErrors: [], screenshots: [] };
const t0 = Date.now();
const mark = name => {
  result.steps[name] = Date.now() - t0;
  console.error(`[drive] ${name} after ${result.steps[name]} ms`);
};

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader',
];
const SHAPES = 'svg.svg-layer polyline, svg.svg-layer ellipse';

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dicom-covid-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: cfg.chromium ?? '/usr/bin/chromium',
  headless: true,
  args: CHROMIUM_ARGS,
  viewport: { width: 1400, height: 900 },
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(timeout);
page.on('console', msg => {
  if (msg.type() === 'error') result.consoleErrors.push(msg.text().slice(0, 300));
});
page.on('pageerror', err => result.pageErrors.push(String(err).slice(0, 300)));

// OHIF's first-load prompts: the investigational-use notice and the onboarding tour.
const PROMPTS = [
  page.locator('[data-cy="confirm-and-hide-button"]'), // "Confirm and hide"
  page.getByText('Skip all', { exact: true }),
];
for (const prompt of PROMPTS) {
  await page.addLocatorHandler(prompt, async loc => {
    await loc.first().click();
  });
}
async function dismissPrompts() {
  for (const prompt of PROMPTS) {
    const visible = await prompt
      .first()
      .isVisible()
      .catch(() => false);
    if (visible) {
      // the locator handler may click it first: then this click finds nothing, which is fine
      await prompt
        .first()
        .click({ timeout: 3000 })
        .catch(() => null);
    }
  }
}

async function shot(name) {
  await dismissPrompts();
  await page.mouse.move(1399, 899); // no hover highlight in the picture
  const file = path.join(cfg.outDir, name);
  await page.screenshot({ path: file });
  result.screenshots.push(file);
}

async function svgState() {
  return page.evaluate(sel => {
    const shapes = [...document.querySelectorAll(sel)];
    const texts = [...document.querySelectorAll('svg.svg-layer text')].map(t =>
      [...t.querySelectorAll('tspan')].map(s => s.textContent).join('\n') || t.textContent
    );
    return {
      shapes: shapes.map(s => ({
        tag: s.tagName,
        points: (s.getAttribute('points') || '').trim().split(/\s+/).filter(Boolean).length,
      })),
      texts,
    };
  }, SHAPES);
}

let exitCode = 0;
try {
  // 1. The study list: the study is listed; selecting it lists its series.
  await page.goto(cfg.viewerUrl, { waitUntil: 'commit' });
  const row = page.getByText(cfg.accession, { exact: true }).first();
  await row.waitFor();
  mark('study_list');
  await dismissPrompts();
  await row.click();
  const panel = page.getByText(cfg.srDescription, { exact: true }).first();
  await panel.waitFor();
  await page.getByText(cfg.scDescription, { exact: true }).first().waitFor();
  result.studyListText = await page.evaluate(() => document.body.innerText);
  await shot('study-list.png');

  // 2. The viewer on the study: the study browser lists the SR and the heat map.
  const studyUrl = new URL('viewer', cfg.viewerUrl);
  studyUrl.searchParams.set('StudyInstanceUIDs', cfg.studyInstanceUid);
  await page.goto(studyUrl.href, { waitUntil: 'commit' });
  const browser = page.locator('[data-cy="studyBrowser-panel"]');
  const srEntry = browser
    .locator('[data-cy^="study-browser-thumbnail"]')
    .filter({ hasText: cfg.srDescription })
    .first();
  const scEntry = browser
    .locator('[data-cy^="study-browser-thumbnail"]')
    .filter({ hasText: cfg.scDescription })
    .first();
  await srEntry.waitFor();
  await scEntry.waitFor();
  await page.locator('[data-cy="viewport-pane"]').first().waitFor();
  mark('viewer');
  await dismissPrompts();
  result.studyBrowserText = await browser.innerText();

  // 3. Double-click the SR: OHIF shows the source image with the region and its text box.
  await srEntry.dblclick();
  const tSr = Date.now();
  await page.waitForFunction(
    sel => {
      const texts = [...document.querySelectorAll('svg.svg-layer text')].map(t => t.textContent);
      return document.querySelector(sel) && texts.join(' ').includes('P(COVID-19)');
    },
    SHAPES
  );
  result.srSeconds = (Date.now() - tSr) / 1000;
  const state = await svgState();
  mark('sr_outline');
  result.sr = state;
  result.srViewportOverlay = await page.evaluate(
    () => document.querySelector('[data-cy="viewport-overlay-top-left"]')?.innerText ?? ''
  );
  await shot('sr-outline.png');

  // 4. Double-click the heat map: it is its own series, shown as an image.
  await scEntry.dblclick();
  await page.waitForFunction(
    desc => {
      const overlay = document.querySelector('[data-cy="viewport-overlay-top-left"]');
      if (!overlay || !overlay.innerText.includes(desc)) return false;
      const engine = window.cornerstone?.getRenderingEngines?.()[0];
      const vp = engine?.getViewports?.()[0];
      return Boolean(vp?.getImageData?.());
    },
    cfg.scDescription
  );
  // Let the new image reach the screen (two animation frames), then take the picture.
  await page.evaluate(
    () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))
  );
  mark('heatmap');
  result.heatmap = await page.evaluate(() => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return {
      imageId: vp.getCurrentImageId(),
      overlay: document.querySelector('[data-cy="viewport-overlay-top-left"]')?.innerText ?? '',
    };
  });
  await shot('heatmap.png');
} catch (err) {
  exitCode = 1;
  result.error = String(err?.stack ?? err);
  await page
    .screenshot({ path: path.join(cfg.outDir, 'failure.png') })
    .then(() => result.screenshots.push(path.join(cfg.outDir, 'failure.png')))
    .catch(() => null);
  result.bodyText = await page.evaluate(() => document.body?.innerText ?? '').catch(() => '');
} finally {
  result.totalMs = Date.now() - t0;
  fs.writeFileSync(path.join(cfg.outDir, 'result.json'), JSON.stringify(result, null, 2));
  console.log('RESULT ' + JSON.stringify(result));
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
