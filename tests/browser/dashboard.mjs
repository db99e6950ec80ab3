// Drives the dashboard in Debian's chromium for tests/dashboard.rs:
//   node dashboard.mjs URL PEER_ID FILE SCREENSHOT
// Waits for the peer and a transfer in progress, takes the screenshot, then drops FILE on the
// share zone and prints "ADDED <hash>" from the page.
import { chromium } from "playwright-core";
import fs from "node:fs";

const [url, peer, file, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on("pageerror", (e) => console.log("PAGE ERROR " + e.message));
  await page.goto(url);
  await page.waitForSelector(`#peers tr.peer code[title="${peer}"]`, { timeout: 30000 });
  console.log("PEER listed");
  await page.waitForFunction(() => [...document.querySelectorAll("#transfers .transfer .pct")]
    .some((p) => { const v = parseFloat(p.textContent); return v > 0 && v < 100; }), null, { timeout: 30000 });
  const pct = await page.textContent("#transfers .transfer .pct");
  console.log("TRANSFER " + pct);
  await page.waitForFunction(() => document.getElementById("live").textContent === "live", null, { timeout: 10000 });
  await page.screenshot({ path: shot, fullPage: true });
  // A drop on the share zone, carrying the file, as a drag from the desktop does.
  const data = fs.readFileSync(file).toString("base64");
  await page.evaluate(({ data, name }) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name));
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, { data, name: "dropped.bin" });
  await page.waitForSelector("#addedhash", { timeout: 30000 });
  console.log("ADDED " + (await page.textContent("#addedhash")));
} finally {
  await browser.close();
}
