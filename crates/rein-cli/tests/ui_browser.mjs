// Drives the dashboard in a real browser (Debian's chromium, headless, through playwright-core):
// signs in, opens the runs list, opens a run's trace, approves the held run from the approvals
// page, and checks the page says it completed. Screenshots go to OUT_DIR.
//
// Usage: node ui_browser.mjs BASE_URL TENANT_KEY DONE_RUN_ID HELD_RUN_ID OUT_DIR
// Needs PLAYWRIGHT_CORE (the package's directory) and CHROMIUM (the browser's path).
import { createRequire } from 'node:module';
import path from 'node:path';

const [base, key, doneId, heldId, outDir] = process.argv.slice(2);
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

function check(ok, what) {
  if (!ok) {
    throw new Error(`check failed: ${what}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const shot = (name) => page.screenshot({ path: path.join(outDir, `${name}.png`), fullPage: true });

  await page.goto(`${base}/ui/runs`);
  check(page.url().endsWith('/ui/login'), `not signed in, sent to the sign-in page (at ${page.url()})`);
  await shot('1-sign-in');
  await page.fill('#key', key);
  await page.click('#sign-in');
  await page.waitForURL('**/ui/runs');

  const runs = await page.textContent('#runs');
  check(runs.includes(doneId) && runs.includes(heldId), 'the runs list shows both runs');
  await shot('2-runs');

  await page.click(`a[href="/ui/runs/${doneId}"]`);
  await page.waitForURL(`**/ui/runs/${doneId}`);
  const tree = await page.textContent('#tree');
  check(tree.includes('pay'), 'the trace tree shows the tool call');
  check((await page.textContent('#status')).trim() === 'completed', 'the run is completed');
  await shot('3-trace');

  await page.click('a[href="/ui/approvals"]');
  await page.waitForURL('**/ui/approvals');
  check((await page.textContent('#approvals')).includes(heldId), 'the held run is in the queue');
  await shot('4-approvals');
  await page.click(`button.approve[data-run="${heldId}"]`);
  await page.waitForSelector('#decided');
  const decided = await page.textContent('#decided');
  check(decided.includes('approved') && decided.includes('completed'), `the run continued: ${decided}`);
  await shot('5-approved');

  await page.click('a[href="/ui/status"]');
  await page.waitForURL('**/ui/status');
  check((await page.textContent('#breakers')).includes('breaker:model:'), 'the model breaker is listed');
  await shot('6-status');
  console.log('ok');
} finally {
  await browser.close();
}
