// The pipeline's resize in TensorFlow.js, for the node runner and the demo page.
//
// flowers resizes every photo with tf.image.resize(bilinear, antialias=True), then rounds to uint8
// (flowers/images.py). TensorFlow.js has no antialiased resize (its resizeBilinear samples 4 pixels
// whatever the scale, so a large photo shrunk to 224 px aliases). TensorFlow's antialiased resize is
// a separable weighted sum (its ScaleAndTranslate op with a triangle kernel widened by the scale):
// the weights are computed here as TensorFlow computes them (float32 steps, Math.fround), and
// applied as two matrix products. The result matches flowers' pixels up to float32 summation
// order (a pixel may round to its neighbouring integer now and then).

const FLOAT_MIN = 1.1754943508222875e-38;  // std::numeric_limits<float>::min()

// weights[x * inSize + s]: how much input pixel s contributes to output pixel x.
export function resizeWeights(inSize, outSize) {
  const f = Math.fround;
  const scale = f(outSize / inSize);
  const invScale = f(1 / scale);
  const kernelScale = Math.max(invScale, 1);  // widened when shrinking: the antialias
  const oneOverKernelScale = f(1 / kernelScale);
  const weights = new Float32Array(outSize * inSize);
  for (let x = 0; x < outSize; x++) {
    const sample = f(f(x + 0.5) * invScale);
    if (sample < 0 || sample > inSize) continue;
    let start = Math.ceil(f(f(sample - kernelScale) - 0.5));
    let end = Math.floor(f(f(sample + kernelScale) - 0.5));
    start = Math.min(Math.max(start, 0), inSize - 1);
    end = Math.min(Math.max(end, 0), inSize - 1) + 1;
    let total = 0;
    for (let s = start; s < end; s++) {
      const position = f(Math.abs(f(f(f(s) + 0.5) - sample)) * oneOverKernelScale);
      const weight = position < 1 ? f(1 - position) : 0;  // the triangle kernel, radius 1
      weights[x * inSize + s] = weight;
      total = f(total + weight);
    }
    if (Math.abs(total) >= 1000 * FLOAT_MIN) {
      const oneOverTotal = f(1 / total);
      for (let s = start; s < end; s++) weights[x * inSize + s] = f(weights[x * inSize + s] * oneOverTotal);
    }
  }
  return weights;
}

// image: a [H, W, 3] tensor (any size, 0..255) -> float32 [size, size, 3], integers 0..255.
export function resizeLikeFlowers(tf, image, size) {
  return tf.tidy(() => {
    const [height, width] = image.shape;
    let pixels = tf.cast(image, 'float32');
    if (height !== size || width !== size) {
      const wy = tf.tensor2d(resizeWeights(height, size), [size, height]);
      const wx = tf.tensor2d(resizeWeights(width, size), [size, width]);
      const rows = tf.matMul(wy, pixels.reshape([height, width * 3])).reshape([size, width, 3]);
      const both = tf.matMul(wx, rows.transpose([1, 0, 2]).reshape([width, size * 3]));
      pixels = both.reshape([size, size, 3]).transpose([1, 0, 2]);
    }
    return pixels.round().clipByValue(0, 255);
  });
}
