// Runs a flowers TF.js graph model in node for flowers (flowers/export/formats/tfjs.py):
//
//     node runner.mjs MODEL_DIR BACKEND      BACKEND: cpu | wasm
//
// Frames on stdin and stdout: a 4-byte little-endian length, a JSON header, then the tensor's bytes.
//   in:  {"shape": [N, H, W, 3]} + float32 RGB 0..255, any H and W (resized as flowers resizes:
//        resize.js), or {"quit": true}
//   out: first {"ready": true, "backend", "tfjs", "node", "image_size", "classes"}; then per input
//        {"shape": [N, C]} + float32 probabilities; or {"error": "one line"}
// Pure @tensorflow/tfjs: @tensorflow/tfjs-node cannot be installed offline (it downloads a native
// library), so the model files are read here and handed to tf.io.fromMemory.
import fs from 'node:fs';
import path from 'node:path';

import {require, wasmDir} from './modules.mjs';
import {resizeLikeFlowers} from './resize.js';

// Protocol frames own stdout: tfjs' console greeting ("install the node backend") goes to stderr.
const out = process.stdout;
const CHUNK = 8;  // images per predict call
console.log = console.error;
console.info = console.error;
console.warn = console.error;

function send(header, data) {
  const head = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(4);
  length.writeUInt32LE(head.length);
  out.write(Buffer.concat([length, head, data ? Buffer.from(data.buffer, data.byteOffset, data.byteLength) : Buffer.alloc(0)]));
}

function fail(error) {
  send({error: String(error && error.message ? error.message : error).split('\n')[0]});
  process.exit(1);
}

async function loadModel(tf, modelDir) {
  const model = JSON.parse(fs.readFileSync(path.join(modelDir, 'model.json'), 'utf8'));
  const specs = [];
  const buffers = [];
  for (const group of model.weightsManifest) {
    specs.push(...group.weights);
    for (const file of group.paths) buffers.push(fs.readFileSync(path.join(modelDir, file)));
  }
  const data = Buffer.concat(buffers);
  const weightData = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
  const graph = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: model.modelTopology, weightSpecs: specs, weightData, format: model.format,
    generatedBy: model.generatedBy, convertedBy: model.convertedBy, signature: model.signature,
    userDefinedMetadata: model.userDefinedMetadata}));
  // [N, S, S, 3] -> [N, C], read from the signature the converter wrote
  const dims = (tensor) => tensor.tensorShape.dim.map(d => Number(d.size));
  const input = dims(Object.values(model.signature.inputs)[0]);
  const output = dims(Object.values(model.signature.outputs)[0]);
  return {graph, size: input[1], classes: output[1]};
}

async function main() {
  const [modelDir, backend] = process.argv.slice(2);
  if (!modelDir || !['cpu', 'wasm'].includes(backend)) fail('usage: node runner.mjs MODEL_DIR cpu|wasm');
  const tf = require('@tensorflow/tfjs');
  if (backend === 'wasm') require('@tensorflow/tfjs-backend-wasm').setWasmPaths(wasmDir);
  if (!(await tf.setBackend(backend))) fail(`the tfjs ${backend} backend did not start`);
  await tf.ready();
  const {graph, size, classes} = await loadModel(tf, modelDir);
  send({ready: true, backend: tf.getBackend(), tfjs: tf.version.tfjs, node: process.version,
        image_size: size, classes});

  // stdin arrives in 64 KiB pieces: keep them in a list and join only what a frame needs (joining
  // on every piece copies a 38 MB batch of 224 px images hundreds of times).
  const pieces = [];
  let buffered = 0;
  const take = (size) => {
    const joined = Buffer.concat(pieces, buffered);
    pieces.length = 0;
    if (joined.length > size) pieces.push(joined.subarray(size));
    buffered = joined.length - size;
    return joined.subarray(0, size);
  };
  let headLength = null;  // of the frame being read, once its 4 bytes are in
  let header = null;  // the frame's JSON header, once it is in
  for await (const piece of process.stdin) {
    pieces.push(piece);
    buffered += piece.length;
    for (;;) {
      if (headLength === null) {
        if (buffered < 4) break;
        headLength = take(4).readUInt32LE(0);
      }
      if (header === null) {
        if (buffered < headLength) break;
        header = JSON.parse(take(headLength).toString('utf8'));
        if (header.quit) process.exit(0);
      }
      const [n, h, w, c] = header.shape;
      const bytes = n * h * w * c * 4;
      if (buffered < bytes) break;
      const raw = take(bytes);
      headLength = null;
      header = null;
      const values = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
      // A few images at a time: a whole batch of 224 px images through ResNet50 on the CPU backend
      // holds every activation in JS memory at once and runs many times slower per image.
      const result = new Float32Array(n * classes);
      const perImage = h * w * c;
      for (let start = 0; start < n; start += CHUNK) {
        const count = Math.min(CHUNK, n - start);
        const probabilities = tf.tidy(() => {
          const images = tf.tensor4d(values.subarray(start * perImage, (start + count) * perImage),
                                     [count, h, w, c]);
          const batch = (h === size && w === size) ? images
            : tf.stack(tf.unstack(images).map(image => resizeLikeFlowers(tf, image, size)));
          return graph.predict(batch);
        });
        result.set(await probabilities.data(), start * classes);
        probabilities.dispose();
      }
      send({shape: [n, classes]}, result);
    }
  }
}

main().catch(fail);
