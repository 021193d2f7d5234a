// The demo page: loads model.json (served beside this file), classifies the photo the user picks
// and shows the top-5 species. The photo is resized as flowers resizes it (resize.js: bilinear with
// antialias, rounded), so the page sees the pixels `flowers predict` sees, decoder aside.
// The outcome is also left in document.body.dataset.result (JSON) for automated checks.
import {resizeLikeFlowers} from './resize.js';

const tf = window.tf;
const status = document.getElementById('status');
const chooser = document.getElementById('backend');
const params = new URLSearchParams(location.search);
let model, classNames, size;

async function start(backend) {
  status.textContent = `loading the model (${backend} backend)...`;
  document.body.dataset.ready = '';
  tf.wasm.setWasmPaths(new URL('./', location.href).href);
  if (!(await tf.setBackend(backend))) throw new Error(`the ${backend} backend did not start`);
  await tf.ready();
  [model, classNames] = await Promise.all([
    model || tf.loadGraphModel('model.json'),
    classNames || fetch('class_names.json').then(r => r.json())]);
  size = model.inputs[0].shape ? model.inputs[0].shape[1] : Number(
    Object.values(model.modelSignature.inputs)[0].tensorShape.dim[1].size);
  status.textContent = `ready: ${classNames.length} classes, ${size}x${size} px, tfjs ${tf.version.tfjs} ` +
    `on ${tf.getBackend()}. Pick a photo.`;
  document.body.dataset.ready = tf.getBackend();
}

async function classify(file) {
  const photo = document.getElementById('photo');
  photo.src = URL.createObjectURL(file);
  await photo.decode();
  const started = performance.now();
  const probabilities = tf.tidy(() => {
    const pixels = resizeLikeFlowers(tf, tf.browser.fromPixels(photo), size);
    return model.predict(pixels.expandDims(0)).squeeze();
  });
  const values = Array.from(await probabilities.data());
  probabilities.dispose();
  const ms = performance.now() - started;
  const top = values.map((p, i) => ({class: classNames[i], probability: p}))
    .sort((a, b) => b.probability - a.probability).slice(0, 5);
  const rows = document.querySelector('#top tbody');
  rows.innerHTML = '';
  for (const {class: name, probability} of top) {
    const row = rows.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = probability.toFixed(4);
    const bar = row.insertCell();
    bar.className = 'p';
    bar.innerHTML = `<div class="bar" style="width:${(100 * probability).toFixed(1)}%"></div>`;
  }
  status.textContent = `${file.name}: ${photo.naturalWidth}x${photo.naturalHeight} px, ` +
    `classified in ${ms.toFixed(0)} ms on ${tf.getBackend()}`;
  document.body.dataset.result = JSON.stringify({image: file.name, top, probabilities: values,
                                                  backend: tf.getBackend(), ms});
}

function fail(error) {
  status.textContent = `error: ${error.message || error}`;
  document.body.dataset.error = String(error.message || error);
}

chooser.value = params.get('backend') || 'wasm';
chooser.addEventListener('change', () => start(chooser.value).catch(fail));
document.getElementById('file').addEventListener('change', event => {
  if (event.target.files.length) classify(event.target.files[0]).catch(fail);
});
start(chooser.value).catch(fail);
