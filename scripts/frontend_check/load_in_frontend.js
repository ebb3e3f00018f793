const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const logs = [];
  page.on('console', m => { if (['error', 'warning'].includes(m.type())) logs.push(m.type() + ': ' + m.text()); });
  page.on('pageerror', e => logs.push('pageerror: ' + e.message));
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  await page.waitForTimeout(3000);
  const results = {};
  for (const f of files) {
    const wf = JSON.parse(fs.readFileSync(f, 'utf8'));
    logs.length = 0;
    const r = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf, true, true, null);
      await new Promise(r => setTimeout(r, 500));
      const p = await window.app.graphToPrompt();
      return { nodes: window.app.graph.nodes.length, types: window.app.graph.nodes.map(n => n.type), prompt: p.output };
    }, wf);
    r.logs = logs.slice();
    results[f] = r;
    await page.keyboard.press('Escape'); await page.waitForTimeout(300);
    await page.screenshot({ path: process.env.SCREENSHOT_DIR + '/' + f.replace(/.*\//, '').replace('.json', '.png') });
  }
  fs.writeFileSync(process.env.RESULTS_JSON, JSON.stringify(results, null, 1));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
