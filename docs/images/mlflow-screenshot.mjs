// Takes docs/images/mlflow-compare.png: the MLflow UI's charts of one `flowers compare --track mlflow`
// (the parent run unfolded to its backend runs, the charts filtered to the validation metrics).
//
//   npm install puppeteer-core@24.32.0      # or NODE_PATH=<flowers tools dir>/node/node_modules
//   node docs/images/mlflow-screenshot.mjs "http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART" out.png
//
// Needs Chromium at /usr/bin/chromium (Debian's package) or $CHROMIUM.
import puppeteer from "puppeteer-core";

const [url, out] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--disable-gpu"], defaultViewport: {width: 1500, height: 1560},
});
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
try {
  const page = await browser.newPage();
  await page.goto(url, {waitUntil: "networkidle0", timeout: 60000});
  await pause(3000);
  const assistant = await page.$('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (assistant) await assistant.click();
  // the comparison's parent run folds its children: unfold it
  const unfold = await page.$('button[data-component-id$="runnamecellrenderer.tsx_46"]');
  if (unfold) await unfold.click();
  await pause(1500);
  await page.type('input[placeholder="Search metric charts"]', "val_");
  await pause(2500);
  await page.screenshot({path: out});
} finally {
  await browser.close();
}
