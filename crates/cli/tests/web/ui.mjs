// The web UI in a real browser: Playwright (playwright-core) driving
// Debian's Chromium against `agentvm serve` on loopback, started by
// crates/cli/tests/suite/server/web.rs, which passes:
//   AGENTVM_URL, AGENTVM_KEY, AGENTVM_REPO (a git repo under the allowed
//   root), CHROMIUM (its binary), SHOTS (a directory for screenshots, or
//   empty).
// Prints one line per step; any failure, console error or warning, or a
// script that ran from injected text, exits non-zero.
import { chromium } from "playwright-core";

const { AGENTVM_URL: url, AGENTVM_KEY: key, AGENTVM_REPO: repo, CHROMIUM: exe, SHOTS: shots } = process.env;
const problems = [];
const step = (s) => console.log(`step: ${s}`);
function check(ok, what) {
  if (!ok) throw new Error(`failed: ${what}`);
}

const browser = await chromium.launch({
  executablePath: exe,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let code = 0;
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  // the browser logs every answer of 400 and above as a console error:
  // the two the steps ask for (a refused key, a refused form) are not
  // problems of the page
  let expected = [];
  page.on("console", (m) => {
    if (m.type() !== "error" && m.type() !== "warning") return;
    const t = m.text();
    const i = expected.findIndex((code) => t.startsWith("Failed to load resource") && t.includes(`status of ${code} `));
    if (i >= 0) expected.splice(i, 1);
    else problems.push(`console ${m.type()}: ${t}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("dialog", (d) => d.accept());
  page.setDefaultTimeout(30000);
  const shot = async (name) => {
    if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  };

  step("sign in: a wrong key is refused, the right one lists jobs");
  await page.goto(url);
  expected.push(401);
  await page.getByLabel("API key").fill("avm_wrong");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("That key was refused.").waitFor();
  check((await page.evaluate(() => sessionStorage.getItem("agentvm.key"))) === null, "a refused key was kept");
  await shot("signin");
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Jobs" }).waitFor();
  check(!page.url().includes(key), "the key is in the URL");
  check((await ctx.cookies()).length === 0, "a cookie was set");

  step("the server's validation messages show beside the fields");
  await page.getByRole("link", { name: "New job", exact: true }).first().click();
  await page.getByLabel("Repository (a path under the server's allowed roots)").fill("/definitely/not/allowed");
  await page.getByLabel("Prompt").fill("true");
  expected.push(422);
  await page.getByRole("button", { name: "Start" }).click();
  await page.locator("#err-repo_path").filter({ hasText: /./ }).waitFor();
  await shot("new-job");

  step("a job whose output, file name and prompt carry HTML and script");
  const evil = `<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>`;
  const prompt = `echo '${evil}'; echo hi > '<b>bold<img src=y onerror=window.__pwned=3>.txt'; echo done-marker`;
  await page.getByLabel("Repository (a path under the server's allowed roots)").fill(repo);
  await page.getByLabel("Prompt").fill(prompt);
  await page.getByRole("button", { name: "Start" }).click();
  await page.locator("#log").filter({ hasText: "done-marker" }).waitFor();
  const logText = await page.locator("#log").textContent();
  check(logText.includes(evil), `the output did not show literally: ${logText}`);
  check((await page.locator("#log img, #log script").count()) === 0, "output became elements");
  await page.locator("#patch .diff").filter({ hasText: "<b>bold<img src=y onerror=window.__pwned=3>.txt" }).waitFor();
  check((await page.locator("#patch b, #patch img").count()) === 0, "a file name became markup");
  await page.getByRole("button", { name: "Side by side" }).click();
  await page.locator("#patch table.side td.add").filter({ hasText: "hi" }).waitFor();
  await page.locator("#patch table.side th.file").filter({ hasText: "<b>bold<img src=y onerror=window.__pwned=3>.txt" }).waitFor();
  check((await page.locator("#patch b, #patch img").count()) === 0, "a file name became markup side by side");
  await page.getByRole("button", { name: "Unified" }).click();
  check((await page.locator('dd[data-field="prompt"]').textContent()) === prompt, "the prompt did not show literally");
  check((await page.evaluate(() => window.__pwned)) === undefined, "injected script ran");
  await shot("job");

  step("play the job's recording, and seek in it");
  await page.getByRole("button", { name: "Play recording" }).click();
  await page.getByRole("button", { name: "Play", exact: true }).click();
  const playerRows = page.locator("#player .xterm-rows");
  await playerRows.filter({ hasText: "done-marker" }).waitFor();
  check((await playerRows.innerText()).includes(evil), "the recording does not show the output literally");
  await page.getByLabel("Position").fill("0");
  await page
    .waitForFunction(() => !document.querySelector("#player .xterm-rows").innerText.includes("done-marker"), null, { timeout: 5000 })
    .catch(() => check(false, "seeking to the start kept the end"));
  const max = await page.getByLabel("Position").getAttribute("max");
  await page.getByLabel("Position").fill(max);
  await playerRows.filter({ hasText: "done-marker" }).waitFor();

  step("apply: the patch lands on a new branch");
  await page.getByRole("button", { name: "Apply to a new branch" }).click();
  await page.locator("#apply-result").filter({ hasText: "agentvm/" }).waitFor();
  const applied = await page.locator("#apply-result").textContent();
  check(applied.startsWith("Applied on branch agentvm/"), applied);

  step("a job's egress decisions show as they are made");
  await page.getByRole("link", { name: "New job", exact: true }).first().click();
  await page.getByLabel("Repository (a path under the server's allowed roots)").fill(repo);
  await page.getByLabel(/^Network/).fill("allow:127.0.0.1:9");
  await page.getByLabel("Prompt").fill("curl -s -o /dev/null http://blocked.example/; echo egress-done");
  await page.getByRole("button", { name: "Start" }).click();
  await page.locator("#egress tr").filter({ hasText: "blocked.example:80" }).filter({ hasText: "refused: host-not-allowlisted" }).waitFor();
  await page.locator("#log").filter({ hasText: "egress-done" }).waitFor();

  step("a 50 MB log stays scrollable: only a screenful of it is in the page");
  await page.getByRole("link", { name: "New job", exact: true }).first().click();
  await page.getByLabel("Repository (a path under the server's allowed roots)").fill(repo);
  await page.getByLabel("Prompt").fill("yes 'one line of a long log, the same again and again, to fill fifty MB' | head -c 50000000; echo; echo big-end");
  await page.getByRole("button", { name: "Start" }).click();
  await page.locator("#log").filter({ hasText: "big-end" }).waitFor({ timeout: 120000 });
  const big = await page.evaluate(() => {
    const box = document.getElementById("log");
    const inPage = box.querySelector("pre").textContent.length;
    box.scrollTop = box.scrollHeight / 2;
    return { inPage, height: box.scrollHeight };
  });
  check(big.inPage < 100000, `the page holds ${big.inPage} characters of the log`);
  check(big.height > 1000000, `the log is ${big.height} px tall: not all of it arrived`);
  await page.waitForFunction(() => {
    const t = document.querySelector("#log pre").textContent;
    return t.includes("one line of a long log") && !t.includes("big-end");
  });
  await shot("big-log");

  step("cancel a long job, then find it by its status");
  await page.getByRole("link", { name: "New job", exact: true }).first().click();
  await page.getByLabel("Repository (a path under the server's allowed roots)").fill(repo);
  await page.getByLabel("Prompt").fill("echo started-long; sleep 300");
  await page.getByRole("button", { name: "Start" }).click();
  await page.locator("#log").filter({ hasText: "started-long" }).waitFor();
  await page.getByRole("button", { name: "Cancel" }).click();
  await page.locator('dd[data-field="status"]').filter({ hasText: "cancelled" }).waitFor();
  const jobUrl = page.url();
  const cancelledId = decodeURIComponent(jobUrl.split("#/jobs/")[1]);
  await page.getByRole("link", { name: "Jobs", exact: true }).click();
  await page.getByLabel("Status").selectOption("cancelled");
  // the filtered list replaces the whole one: the cancelled job alone
  await page.waitForFunction((id) => {
    const rows = [...document.querySelectorAll("tbody tr")];
    return rows.length === 1 && rows[0].textContent.includes(id);
  }, cancelledId);
  await page.getByLabel("Status").selectOption("");
  await page.locator("tbody tr").nth(1).waitFor();
  await shot("jobs");

  step("phone width: the list still reads");
  await page.setViewportSize({ width: 390, height: 800 });
  await page.getByRole("heading", { name: "Jobs" }).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  check(!overflow, "the page scrolls sideways at phone width");
  await page.setViewportSize({ width: 1280, height: 800 });

  step("workspaces: create, two jobs with checkpoints between, diff, fork, restore, apply");
  const wsJob = async (script, marker) => {
    await page.getByRole("link", { name: "New job", exact: true }).first().click();
    await page.getByLabel("or a workspace (id or name)").fill("ui-ws");
    await page.getByLabel("Prompt").fill(script);
    await page.getByRole("button", { name: "Start" }).click();
    await page.locator("#log").filter({ hasText: marker }).waitFor();
    await page.locator('dd[data-field="status"]').filter({ hasText: "succeeded" }).waitFor();
  };
  await page.getByRole("link", { name: "Workspaces", exact: true }).click();
  await page.getByLabel("Name").fill("ui-ws");
  await page.getByLabel("Repository").fill(repo);
  await page.getByRole("button", { name: "Create workspace" }).click();
  await page.getByRole("heading", { name: "Workspace ui-ws" }).waitFor();
  const wsUrl = page.url();
  check(!(await page.locator("main dl").innerText()).includes("undefined"), "a field shows undefined");
  await wsJob("echo one > ws-file; echo wrote-one", "wrote-one");
  await page.goto(wsUrl);
  await page.getByLabel("Checkpoint name").fill("first");
  await page.getByRole("button", { name: "Checkpoint", exact: true }).click();
  await page.locator('li[data-checkpoint="first"]').waitFor();
  await wsJob("echo two >> ws-file; echo wrote-two", "wrote-two");
  await page.goto(wsUrl);
  await page.getByLabel("Checkpoint name").fill("second");
  await page.getByRole("button", { name: "Checkpoint", exact: true }).click();
  await page.locator('li[data-checkpoint="second"]').waitFor();
  await page.getByLabel("From").selectOption({ label: "first" });
  await page.getByLabel("To").selectOption({ label: "second" });
  await page.getByRole("button", { name: "Show diff" }).click();
  await page.locator("#diff .add").filter({ hasText: "+two" }).waitFor();
  check((await page.locator("#diff .add").filter({ hasText: "+one" }).count()) === 0, "the diff from first holds first's change");
  await shot("workspace");
  await page.getByRole("button", { name: "Restore first" }).click();
  await page.locator("#ws-result").filter({ hasText: "Restored to first" }).waitFor();
  await page.getByLabel("From").selectOption({ label: "the repository" });
  await page.getByLabel("To").selectOption({ label: "now" });
  await page.getByRole("button", { name: "Show diff" }).click();
  await page.locator("#diff .add").filter({ hasText: "+one" }).waitFor();
  check((await page.locator("#diff .add").filter({ hasText: "+two" }).count()) === 0, "restore kept the later change");
  await page.getByRole("button", { name: "Apply to a new branch" }).click();
  await page.locator("#ws-result").filter({ hasText: "Applied on branch agentvm/" }).waitFor();
  await page.getByLabel("Name of a fork of second").fill("ui-fork");
  await page.getByRole("button", { name: "Fork second" }).click();
  await page.getByRole("heading", { name: "Workspace ui-fork" }).waitFor();

  step("a session: a terminal in the browser, typed into, resized, detached and attached again, ended");
  await page.getByRole("link", { name: "Sessions", exact: true }).click();
  await page.getByLabel("Repository (optional)").fill(repo);
  await page.getByRole("button", { name: "Open session" }).click();
  await page.locator("#term-state").filter({ hasText: "attached, writing" }).waitFor();
  const rows = page.locator("#terminal .xterm-rows");
  await page.locator("#terminal").click();
  await page.keyboard.type("echo via-$((6*7)); printf '\\033[31mred-text\\033[0m\\n'\n");
  await rows.filter({ hasText: "via-42" }).waitFor();
  await rows.filter({ hasText: "red-text" }).waitFor();
  const red = await page.evaluate(() => {
    const s = [...document.querySelectorAll("#terminal .xterm-rows span")].find((e) => e.textContent.includes("red-text"));
    return s ? getComputedStyle(s).color : "";
  });
  check(/^rgb\((\d+), (\d+), (\d+)\)$/.test(red) && Number(red.match(/\d+/)[0]) > 150, `the terminal's red is ${red}`);
  await shot("session");
  // the terminal follows the window, and the program inside sees it
  await page.setViewportSize({ width: 700, height: 500 });
  await page.waitForTimeout(300);
  const size = await page.evaluate(() => {
    const r = document.querySelector("#terminal .xterm-rows");
    return r ? r.children.length : 0;
  });
  await page.keyboard.type("stty size\n");
  await page
    .waitForFunction((n) => new RegExp(`(^|\\n)${n} \\d+`).test(document.querySelector("#terminal .xterm-rows").innerText), size, { timeout: 10000 })
    .catch(async () => check(false, `stty size after the resize (${size} rows): ${await rows.innerText()}`));
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.getByRole("button", { name: "Detach" }).click();
  await page.locator("#term-state").filter({ hasText: "detached" }).waitFor();
  await page.getByRole("button", { name: "Attach" }).click();
  await page.locator("#term-state").filter({ hasText: "attached, writing" }).waitFor();
  await rows.filter({ hasText: "via-42" }).waitFor();
  await page.getByRole("button", { name: "Play recording" }).click();
  await page.getByLabel("Position").fill(await page.getByLabel("Position").getAttribute("max"));
  await page.locator("#player .xterm-rows").filter({ hasText: "via-42" }).waitFor();
  await page.getByRole("button", { name: "End session" }).click();
  await page.locator("#term-state").filter({ hasText: "ended" }).waitFor();

  step("overview: running, queued, sessions, failures, and charts from the server's metrics");
  await page.getByRole("link", { name: "Overview", exact: true }).click();
  await page.getByRole("heading", { name: "Recent failures" }).waitFor();
  await page.locator("figure", { hasText: "Egress refusals per minute" }).waitFor();
  const sums = await page.evaluate(() => Object.fromEntries([...document.querySelectorAll("figure.chart-box")].map((f) => [
    f.querySelector("figcaption").textContent.split(" (")[0],
    [...f.querySelectorAll("rect")].reduce((a, r) => a + Number(r.dataset.value), 0),
  ])));
  check(sums["Sandbox start-up"] >= 5 && sums["Job durations"] >= 5, `charts: ${JSON.stringify(sums)}`);
  check(sums["Jobs finished per minute"] >= 5, `jobs per minute: ${JSON.stringify(sums)}`);
  check(sums["Egress refusals per minute"] >= 1, `egress refusals: ${JSON.stringify(sums)}`);
  await shot("overview");

  step("admin: create a key (shown once), revoke it; the audit trail filtered by action and by job");
  await page.getByRole("link", { name: "Keys", exact: true }).click();
  await page.getByLabel("Name").fill("ci-bot");
  await page.getByRole("button", { name: "Create" }).click();
  const secret = await page.locator("#secret").textContent();
  check(secret.startsWith("avm_") && secret.length > 20, `the new key: ${secret}`);
  await page.getByRole("row").filter({ hasText: "ci-bot" }).getByText("active").waitFor();
  await shot("keys");
  await page.getByRole("button", { name: "Revoke ci-bot" }).click();
  await page.getByRole("row").filter({ hasText: "ci-bot" }).getByText(/revoked/).waitFor();
  await page.getByRole("link", { name: "Audit", exact: true }).click();
  await page.getByLabel("Action").fill("key.revoke");
  await page.getByRole("button", { name: "Filter" }).click();
  // the filtered page replaces the whole trail: one row, the revoke
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("tbody tr")];
    return rows.length === 1 && rows[0].textContent.includes("key.revoke");
  });
  await page.getByLabel("Action").fill("");
  await page.getByLabel("Job").fill(cancelledId);
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForFunction((id) => {
    const rows = [...document.querySelectorAll("tbody tr")].map((r) => r.textContent);
    return rows.length === 2 && rows.every((r) => r.includes(id)) && rows.some((r) => r.includes("job.cancel"));
  }, cancelledId);
  await shot("audit");

  step("sign out forgets the key");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  check((await page.evaluate(() => sessionStorage.getItem("agentvm.key"))) === null, "the key was kept");

  check(problems.length === 0, `console: ${problems.join("; ")}`);
  step("all passed");
} catch (e) {
  console.error(String(e && e.stack ? e.stack : e));
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) console.error(`page text: ${await pages[0].locator("main").innerText()}`);
  } catch {}
  if (problems.length) console.error(problems.join("\n"));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
