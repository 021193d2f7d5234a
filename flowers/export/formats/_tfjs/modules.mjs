// The node packages of flowers' TF.js tools: installed by flowers (flowers/toolenvs.py: `npm ci` of
// this folder's package-lock.json) in the folder FLOWERS_NODE_ENV names, loaded from there.
import {createRequire} from 'node:module';
import path from 'node:path';

export const nodeEnv = process.env.FLOWERS_NODE_ENV;
if (!nodeEnv) {
  console.error('FLOWERS_NODE_ENV is not set: flowers starts this script (flowers export --formats tfjs)');
  process.exit(2);
}
export const require = createRequire(path.join(nodeEnv, 'package.json'));
export const wasmDir = path.join(nodeEnv, 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist') + path.sep;
