// Drives ComfyUI's real frontend in headless Chromium (see check.py):
//   node load_in_frontend.js URL MODULE OUT_DIR
// Lists the pack's templates the way the template browser does (/api/workflow_templates), then for
// each one opens the template browser on the pack's category and clicks its card, as a user would,
// and reads back what the frontend made of it. Writes OUT_DIR/results.json and screenshots:
// OUT_DIR/template_browser.png, OUT_DIR/<template>.png (the whole window) and
// OUT_DIR/<template>.canvas.png (the graph alone, in focus mode, cropped to the nodes).
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');

async function openTemplateBrowser(page, module, names) {
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  await page.waitForTimeout(1500);
  await page.getByText(module, { exact: true }).first().click({ timeout: 5000 });
  await page.waitForTimeout(2500);
  // each card's picture (the browser shows a default picture when a thumbnail does not load)
  return page.evaluate((names) => [...document.querySelectorAll('.p-dialog img')]
    .filter((img) => names.includes(img.alt))
    .map((img) => ({ template: img.alt, loaded: img.complete && img.naturalWidth > 0 && !img.src.includes('default-template') })),
  names);
}

async function graphBox(page) {  // where the nodes are on the screen, with a margin
  return page.evaluate(() => {
    const { ds } = window.app.canvas;
    const rect = window.app.canvas.canvas.getBoundingClientRect();
    const xs = window.app.graph.nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
    const ys = window.app.graph.nodes.flatMap((n) => [n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.pos[1] + n.size[1]]);
    const [x0, y0] = ds.convertOffsetToCanvas([Math.min(...xs), Math.min(...ys)]);
    const [x1, y1] = ds.convertOffsetToCanvas([Math.max(...xs), Math.max(...ys)]);
    const margin = 16;
    const left = Math.max(0, rect.left + x0 - margin);
    const top = Math.max(0, rect.top + y0 - margin);
    return { x: left, y: top, width: Math.min(window.innerWidth - left, x1 - x0 + 2 * margin),
             height: Math.min(window.innerHeight - top, y1 - y0 + 2 * margin) };
  });
}

async function closeDialogs(page) {
  for (const button of await page.locator('.p-dialog button[aria-label="Close"], .p-dialog-close-button').all()) {
    if (await button.isVisible()) await button.click();
  }
  await page.waitForTimeout(500);
}

async function readBack(page, module, name) {
  return page.evaluate(async ({ module, name }) => {
    const base = `/api/workflow_templates/${encodeURIComponent(module)}/${encodeURIComponent(name)}`;
    const thumb = await fetch(base + '.jpg');
    const workflow = await (await fetch(base + '.json')).json();
    const saved = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.size]));
    const missingModels = [...document.querySelectorAll('.comfy-missing-models li')].map((li) => li.innerText);
    const prompt = (await window.app.graphToPrompt()).output;
    const ctx = window.app.canvas.ctx;
    const measure = (text, font) => { ctx.save(); ctx.font = font; const w = ctx.measureText(text).width; ctx.restore(); return w; };
    const frames = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 150))));
    const textFit = (el) => {  // content height against box height, in pixels at zoom 1
      if (el.tagName === 'TEXTAREA') {
        const probe = el.cloneNode();
        probe.value = el.value;
        Object.assign(probe.style, { height: '0px', minHeight: '0px', width: el.clientWidth + 'px', position: 'absolute' });
        el.parentNode.appendChild(probe);
        const content = probe.scrollHeight;
        probe.remove();
        return { content, box: el.clientHeight };
      }
      const top = el.getBoundingClientRect().top;
      const blocks = [...el.querySelectorAll('p, li, h1, h2, h3, h4, pre, blockquote')];
      return { content: Math.max(0, ...blocks.map((b) => b.getBoundingClientRect().bottom - top)),
               box: el.getBoundingClientRect().height };
    };
    const view = { scale: window.app.canvas.ds.scale, offset: [...window.app.canvas.ds.offset] };
    const nodes = [];
    for (const n of window.app.graph.nodes) {
      // what the node needs to show everything, measured with the frontend's fonts at zoom 1
      const need = { title: measure(n.title, n.titleFontStyle) + 2 * window.LiteGraph.NODE_TITLE_HEIGHT, widgets: 0, text: [] };
      if ((n.widgets || []).some((w) => w.element)) {  // show the node at zoom 1: DOM widgets render
        window.app.canvas.ds.scale = 1;
        window.app.canvas.ds.offset = [60 - n.pos[0], 120 - n.pos[1]];
        window.app.canvas.setDirty(true, true);
        await frames();
      }
      for (const w of n.widgets || []) {
        if (w.element) {
          need.text.push({ name: w.name, ...textFit(w.element) });
        } else if (w.displayName !== undefined) {
          need.widgets = Math.max(need.widgets, measure(w.displayName, n.innerFontStyle) + 5
                                  + measure(String(w._displayValue ?? ''), n.innerFontStyle) + 4 * 15 + 25);
        }
      }
      nodes.push({ id: n.id, type: n.type, title: n.title, saved: saved[n.id], computed: Array.from(n.computeSize()),
                   size: Array.from(n.size), need });
    }
    Object.assign(window.app.canvas.ds, view);
    window.app.canvas.setDirty(true, true);
    return { thumbnail: { status: thumb.status, type: thumb.headers.get('content-type') }, prompt, nodes,
             missingModels, openedAs: window.app.extensionManager.workflow?.activeWorkflow?.filename ?? null };
  }, { module, name });
}

(async () => {
  const [url, module, outDir] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const logs = [];
  const failedRequests = [];
  page.on('console', (m) => { if (['error', 'warning'].includes(m.type())) logs.push(m.type() + ': ' + m.text()); });
  page.on('pageerror', (e) => logs.push('pageerror: ' + e.message));
  page.on('response', (r) => { if (r.status() >= 400) failedRequests.push(`${r.status()} ${decodeURIComponent(r.url())}`); });
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  await page.waitForTimeout(3000);
  const results = { templates: {}, browser: {} };
  results.names = await page.evaluate(async (m) => (await (await fetch('/api/workflow_templates')).json())[m] || [], module);
  results.startupLogs = logs.splice(0);
  for (const name of results.names) {
    const thumbnails = await openTemplateBrowser(page, module, results.names);
    if (!results.browser.thumbnails) {
      results.browser.thumbnails = thumbnails;
      await page.screenshot({ path: path.join(outDir, 'template_browser.png') });
    }
    await page.getByAltText(name, { exact: true }).first().click();  // the card: loads the template
    await page.waitForTimeout(2000);
    const result = await readBack(page, module, name);
    result.logs = logs.splice(0);
    await closeDialogs(page);  // the missing-models dialog, if any
    await page.screenshot({ path: path.join(outDir, name + '.png') });
    await page.evaluate(() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'));
    await page.waitForTimeout(800);
    await page.screenshot({ path: path.join(outDir, name + '.canvas.png'), clip: await graphBox(page) });
    await page.evaluate(() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'));
    await page.waitForTimeout(500);
    results.templates[name] = result;
  }
  results.failedRequests = failedRequests;
  fs.writeFileSync(path.join(outDir, 'results.json'), JSON.stringify(results, null, 1));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
