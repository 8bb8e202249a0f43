// Drives the built demo in the system's headless Chromium (no browser download):
//   node web/tests/browser.mjs DIST_DIR OUT_DIR
// Serves DIST_DIR on 127.0.0.1, then for each compute path (WebGPU, CPU) checks: no
// console errors, the canvas renders (a screenshot with many colours, saved to OUT_DIR),
// the DTop-p run's a_t settles on T within SETTLE_LIMIT steps, and settles again after
// window.dtopp.setTarget. Prints one JSON line of results; exits non-zero on a failure.
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";
import { PNG } from "pngjs";

const [dist, out] = process.argv.slice(2);
if (!dist || !out) {
  console.error("usage: node browser.mjs DIST_DIR OUT_DIR");
  process.exit(2);
}
const CHROMIUM = process.env.DTOPP_CHROMIUM || "/usr/bin/chromium";
// Steps after a (re)start or a target change within which the 10-step mean of a_t must
// stay within ±2% of T (the controller's measured settling is ~10-15 steps).
const SETTLE_LIMIT = 40;
// Steps observed at each target before judging.
const OBSERVE = 80;
const SECOND_TARGET = 16;

const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".wasm": "application/wasm",
};

function serve(root) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    const rel = url.pathname === "/" ? "index.html" : url.pathname.slice(1);
    const file = path.join(root, path.normalize(rel));
    if (!file.startsWith(path.resolve(root)) || !fs.existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, {
      "content-type": MIME[path.extname(file)] || "application/octet-stream",
    });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

// Distinct colours and the share of the most common one in a PNG's pixels.
function pixelStats(buffer) {
  const png = PNG.sync.read(buffer);
  const counts = new Map();
  for (let i = 0; i < png.data.length; i += 4) {
    const key = (png.data[i] << 16) | (png.data[i + 1] << 8) | png.data[i + 2];
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  const pixels = png.data.length / 4;
  return { colours: counts.size, dominant: Math.max(...counts.values()) / pixels };
}

async function waitFor(page, what, predicate, arg, timeoutMs) {
  try {
    return await page.waitForFunction(predicate, arg, { timeout: timeoutMs, polling: 100 });
  } catch (e) {
    const status = await page.evaluate(() => document.getElementById("dtopp-status")?.textContent);
    throw new Error(`timed out waiting for ${what}; status: ${status}`);
  }
}

async function runVariant(base, variant) {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "dtopp-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      // egui draws through WebGL2 on SwiftShader (renders in headless screenshots).
      "--use-angle=swiftshader",
      "--enable-unsafe-swiftshader",
      ...variant.flags,
    ],
  });
  const errors = [];
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (m) => {
      if (m.type() === "error") errors.push(`console: ${m.text()}`);
    });
    page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
    const started = Date.now();
    await page.goto(base + variant.query);
    const status = () => page.evaluate(() => window.dtopp && window.dtopp.status());

    await waitFor(page, `${OBSERVE} steps`,
      (n) => window.dtopp && window.dtopp.status() && window.dtopp.status().since_target_change >= n,
      OBSERVE, 120_000);
    const first = await status();
    const shot = await page.screenshot({ path: path.join(out, `demo-${variant.name}.png`) });
    const pixels = pixelStats(shot);

    await page.evaluate((t) => window.dtopp.setTarget(t), SECOND_TARGET);
    await waitFor(page, `${OBSERVE} steps at T = ${SECOND_TARGET}`,
      ([t, n]) => {
        const s = window.dtopp.status();
        return s && s.target === t && s.since_target_change >= n;
      },
      [SECOND_TARGET, OBSERVE], 120_000);
    const second = await status();
    await page.screenshot({ path: path.join(out, `demo-${variant.name}-after-step.png`) });
    const history = await page.evaluate(() => window.dtopp.history());
    let badTarget = null;
    try {
      await page.evaluate(() => window.dtopp.setTarget(1000));
    } catch (e) {
      badTarget = e.message.split("\n")[0];
    }
    const seconds = (Date.now() - started) / 1000;
    return { variant: variant.name, first, second, pixels, errors, seconds, badTarget,
      steps: history.step.length };
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

function check(result, expectBackend) {
  const failures = [];
  const { first, second } = result;
  if (result.errors.length) failures.push(`console errors: ${result.errors.join(" | ")}`);
  if (!(result.pixels.colours >= 50 && result.pixels.dominant < 0.95)) {
    failures.push(`the screenshot looks blank: ${JSON.stringify(result.pixels)}`);
  }
  for (const [name, s, t] of [["first target", first, first.target], ["after setTarget", second, SECOND_TARGET]]) {
    if (s.backend !== expectBackend) failures.push(`${name}: backend ${s.backend}, expected ${expectBackend} (${s.routing})`);
    if (s.target !== t) failures.push(`${name}: target ${s.target}, expected ${t}`);
    if (s.settled_after === null || s.settled_after > SETTLE_LIMIT) {
      failures.push(`${name}: a_t did not settle within ${SETTLE_LIMIT} steps (settled_after ${s.settled_after})`);
    }
    if (Math.abs(s.active_experts - t) > 0.1 * t) {
      failures.push(`${name}: a_t = ${s.active_experts} not within 10% of T = ${t}`);
    }
  }
  if (!result.badTarget || !result.badTarget.includes("[1, 64]")) {
    failures.push(`setTarget(1000) was not refused with a clear error: ${result.badTarget}`);
  }
  return failures;
}

fs.mkdirSync(out, { recursive: true });
const server = await serve(path.resolve(dist));
const base = `http://127.0.0.1:${server.address().port}/`;
const variants = [
  { name: "webgpu", flags: ["--enable-unsafe-webgpu"], query: "", backend: "webgpu" },
  { name: "cpu", flags: [], query: "?backend=cpu", backend: "cpu" },
];
let failed = false;
const results = [];
try {
  for (const v of variants) {
    let result;
    try {
      result = await runVariant(base, v);
    } catch (e) {
      console.error(`${v.name}: ${e.message}`);
      failed = true;
      continue;
    }
    const failures = check(result, v.backend);
    result.failures = failures;
    results.push(result);
    if (failures.length) failed = true;
  }
} finally {
  server.close();
}
fs.writeFileSync(path.join(out, "results.json"), JSON.stringify(results, null, 2));
console.log(JSON.stringify(results));
process.exit(failed ? 1 : 0);
