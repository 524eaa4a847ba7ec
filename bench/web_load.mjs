// One first load of the web UI, signed in, to a usable job list: the
// bytes the browser received (everything, headers included) and the time
// from navigation to the list's first page shown. Used by bench/web.py.
// usage: node web_load.mjs URL KEY CHROMIUM
import { chromium } from "playwright-core";

const [url, key, exe] = process.argv.slice(2);
const b = await chromium.launch({ executablePath: exe, args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"] });
const ctx = await b.newContext();
await ctx.addInitScript((k) => sessionStorage.setItem("agentvm.key", k), key);
const page = await ctx.newPage();
const reqs = [];
page.on("requestfinished", (r) => reqs.push(r));
const t0 = Date.now();
await page.goto(url + "/#/jobs");
await page.waitForFunction(() => document.querySelectorAll("tbody tr").length >= 50);
const ms = Date.now() - t0;
let bytes = 0;
for (const r of reqs) {
  const s = await r.sizes();
  bytes += s.responseBodySize + s.responseHeadersSize;
}
console.log(JSON.stringify({ ms, bytes, requests: reqs.length }));
await b.close();
