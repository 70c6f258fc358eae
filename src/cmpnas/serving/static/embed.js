/* In-browser query embedding for the cmpnas search page (window.CmpnasEmbed).
 *
 * Why a port instead of canvas scaling: the gallery index only answers like the server if the page feeds the
 * query model the very tensor cmpnas builds in Python (cmpnas.data.transforms.pil_to_uint8, then
 * normalize_batch). So the decoded pixels go through a line-by-line port of that code: Pillow's RGB->L
 * integer formula, the shorter-side-to-input_size arithmetic with Python's round-half-to-even, Pillow's
 * two-pass fixed-point BILINEAR resampling (src/libImaging/Resample.c of Pillow 13, 8 bits per channel, in the
 * pass order the server's Pillow uses), the centre crop,
 * and x/255 then (x-mean)/std in float32. The model then runs in ONNX Runtime Web (WebAssembly build), and the
 * embedding leaves the page as the little-endian float32 (or float16) body of POST /search/vector.
 *
 * Decoding is the browser's: for opaque 8-bit PNG/GIF/BMP/WebP it gives the same pixels as PIL; JPEG
 * decoders, 16-bit PNGs and semi-transparent pixels (the canvas premultiplies alpha) may differ slightly.
 */
(function (root) {
  "use strict";

  const PRECISION_BITS = 32 - 8 - 2; // Pillow's fixed point for 8-bit resampling
  const ROUND_HALF = 1 << (PRECISION_BITS - 1);
  const SCALE = 1 << PRECISION_BITS;

  /** Python 3's round() of a float to an int: halves go to the even neighbour. */
  function pyRound(x) {
    const f = Math.floor(x);
    const d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function bilinear(x) {
    if (x < 0) x = -x;
    return x < 1 ? 1 - x : 0;
  }

  /** Pillow's precompute_coeffs + normalize_coeffs_8bpc for the box (0, inSize) -> outSize, BILINEAR. */
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = scale < 1 ? 1 : scale;
    const support = 1.0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Int32Array(outSize * ksize);
    const w = new Float64Array(ksize);
    const ss = 1.0 / filterscale;
    for (let xx = 0; xx < outSize; xx++) {
      const center = 0 + (xx + 0.5) * scale;
      let ww = 0.0;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      for (let x = 0; x < xmax; x++) {
        w[x] = bilinear((x + xmin - center + 0.5) * ss);
        ww += w[x];
      }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0.0 ? w[x] / ww : w[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * SCALE) : Math.trunc(0.5 + k * SCALE);
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { bounds, kk, ksize };
  }

  function clip8(ss) {
    const v = ss >> PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : v;
  }

  function horizontalPass(src, w, h, c, nw) {
    const { bounds, kk, ksize } = coefficients(w, nw);
    const out = new Uint8Array(nw * h * c);
    for (let y = 0; y < h; y++) {
      const row = y * w * c;
      for (let xx = 0; xx < nw; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k0 = xx * ksize;
        for (let ch = 0; ch < c; ch++) {
          let ss = ROUND_HALF;
          for (let x = 0; x < xmax; x++) ss += src[row + (x + xmin) * c + ch] * kk[k0 + x];
          out[(y * nw + xx) * c + ch] = clip8(ss);
        }
      }
    }
    return out;
  }

  function verticalPass(src, w, h, c, nh) {
    const { bounds, kk, ksize } = coefficients(h, nh);
    const out = new Uint8Array(w * nh * c);
    for (let yy = 0; yy < nh; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], k0 = yy * ksize;
      for (let x = 0; x < w * c; x++) {
        let ss = ROUND_HALF;
        for (let y = 0; y < ymax; y++) ss += src[(y + ymin) * w * c + x] * kk[k0 + y];
        out[yy * w * c + x] = clip8(ss);
      }
    }
    return out;
  }

  /** Pillow's Image.resize(BILINEAR) of interleaved uint8 pixels (c channels): two passes, each rounded to
   * 8 bits. Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
   * as the width ("pillow13"); older versions always start with the horizontal one ("horizontal-first"). The
   * server tells which its Pillow does (GET /models, resize_pass_order). */
  function resizeBilinear(src, w, h, c, nw, nh, passOrder) {
    const verticalFirst = passOrder !== "horizontal-first" && h - nh > 0 && h - nh > (w - nw) * 2;
    if (verticalFirst) {
      const tall = nh !== h ? verticalPass(src, w, h, c, nh) : src;
      return nw !== w ? horizontalPass(tall, w, nh, c, nw) : tall;
    }
    const wide = nw !== w ? horizontalPass(src, w, h, c, nw) : src;
    return nh !== h ? verticalPass(wide, nw, h, c, nh) : wide;
  }

  /** Decoded RGBA pixels -> the model's input, exactly as cmpnas' Python (pil_to_uint8 + normalize_batch).
   * Returns the uint8 crop (HWC) and the normalised float32 tensor (CHW). */
  function toModelInput(rgba, width, height, model) {
    const c = model.in_chans, size = model.input_size;
    if (c !== 1 && c !== 3) throw new Error(`unsupported in_chans ${c}`);
    const n = width * height;
    const px = new Uint8Array(n * c);
    for (let i = 0; i < n; i++) {
      const r = rgba[i * 4], g = rgba[i * 4 + 1], b = rgba[i * 4 + 2];
      if (c === 1) {
        px[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16; // Pillow's convert("L")
      } else {
        px[i * 3] = r;
        px[i * 3 + 1] = g;
        px[i * 3 + 2] = b;
      }
    }
    const scale = size / Math.min(width, height);
    const nw = Math.max(size, pyRound(width * scale));
    const nh = Math.max(size, pyRound(height * scale));
    const resized = resizeBilinear(px, width, height, c, nw, nh, model.resize_pass_order);
    const left = Math.floor((nw - size) / 2), top = Math.floor((nh - size) / 2);
    const pixels = new Uint8Array(size * size * c);
    const tensor = new Float32Array(size * size * c);
    const mean = Float32Array.from(model.mean), std = Float32Array.from(model.std);
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        for (let ch = 0; ch < c; ch++) {
          const v = resized[((top + y) * nw + left + x) * c + ch];
          pixels[(y * size + x) * c + ch] = v;
          const unit = Math.fround(v / 255); // float32 ops, as torch does them
          tensor[ch * size * size + y * size + x] = Math.fround(Math.fround(unit - mean[ch]) / std[ch]);
        }
      }
    }
    return { pixels, tensor };
  }

  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);

  /** IEEE half-precision bits of a number (round to nearest even), as numpy's astype(float16). */
  function toFloat16(value) {
    f32[0] = value;
    const x = u32[0];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
    const e = exp - 127 + 15;
    if (e >= 0x1f) return sign | 0x7c00;
    if (e <= 0) {
      if (e < -10) return sign;
      mant |= 0x800000;
      const shift = 14 - e;
      let half = mant >>> shift;
      const rem = mant & ((1 << shift) - 1), mid = 1 << (shift - 1);
      if (rem > mid || (rem === mid && (half & 1))) half++;
      return sign | half;
    }
    let half = (e << 10) | (mant >>> 13);
    const rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++;
    return sign | half;
  }

  /** A vector as the little-endian body of POST /search/vector?dtype=float32|float16. float32 is the
   * page's default: 4 bytes a value (512 for 128-d) and exactly the ranking of the server's own embedding;
   * float16 halves that but rounds each value to 11 significant bits, which can swap gallery items whose
   * scores nearly tie. */
  function vectorBody(vector, dtype) {
    const half = dtype === "float16";
    const view = new DataView(new ArrayBuffer(vector.length * (half ? 2 : 4)));
    for (let i = 0; i < vector.length; i++) {
      if (half) view.setUint16(i * 2, toFloat16(vector[i]), true);
      else view.setFloat32(i * 4, vector[i], true);
    }
    return view.buffer;
  }

  function l2normalize(vector) {
    let sum = 0;
    for (let i = 0; i < vector.length; i++) sum += vector[i] * vector[i];
    const norm = Math.max(Math.sqrt(sum), 1e-12);
    return Float32Array.from(vector, (v) => v / norm);
  }

  /** The browser's decoding of an image file to RGBA, without colour management or EXIF rotation (PIL
   * applies neither). Throws on a file that is not an image the browser can read. */
  async function decode(blob) {
    let bitmap;
    const opts = { colorSpaceConversion: "none", premultiplyAlpha: "none" };
    try {
      bitmap = await createImageBitmap(blob, { ...opts, imageOrientation: "none" });
    } catch (err) {
      if (!(err instanceof TypeError)) throw err;
      bitmap = await createImageBitmap(blob, opts); // a browser without imageOrientation "none"
    }
    const { width, height } = bitmap;
    const canvas = typeof OffscreenCanvas !== "undefined"
      ? new OffscreenCanvas(width, height)
      : Object.assign(document.createElement("canvas"), { width, height });
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return { rgba: ctx.getImageData(0, 0, width, height).data, width, height };
  }

  /** ONNX Runtime Web, loaded once, and one inference session per query model. */
  class Runtime {
    constructor(ort, info) {
      this.ort = ort;
      this.info = info;
      this.sessions = new Map();
    }

    /** Import the runtime module (URLs relative to the page) with one WebAssembly thread: without
     * cross-origin isolation the browser allows no more, and one query at a time needs no more. */
    static async load(info) {
      const ort = await import(new URL(info.module, document.baseURI).href);
      ort.env.wasm.wasmPaths = new URL(info.wasm_paths, document.baseURI).href;
      ort.env.wasm.numThreads = 1;
      ort.env.wasm.proxy = false;
      return new Runtime(ort, info);
    }

    /** The model's session (fetched and created on first use, then cached). */
    session(model) {
      if (!this.sessions.has(model.name)) {
        const created = (async () => {
          const resp = await fetch(new URL(model.onnx_url, document.baseURI).href);
          if (!resp.ok) throw new Error(`could not fetch ${model.onnx_url}: HTTP ${resp.status}`);
          const bytes = new Uint8Array(await resp.arrayBuffer());
          return this.ort.InferenceSession.create(bytes, {
            executionProviders: ["wasm"],
            graphOptimizationLevel: "all",
          });
        })();
        created.catch(() => this.sessions.delete(model.name)); // a failed load may be retried
        this.sessions.set(model.name, created);
      }
      return this.sessions.get(model.name);
    }

    /** Decode, preprocess and embed one image; the raw and the L2-normalised embedding, and the times.
     * An image of more than maxPixels pixels is refused (err.name "TooLarge"), as the server would. */
    async embed(blob, model, maxPixels) {
      const session = await this.session(model);
      const t0 = performance.now();
      const img = await decode(blob);
      if (maxPixels && img.width * img.height > maxPixels) {
        const err = new Error(`the image has ${img.width}x${img.height} pixels, over the server's limit of ${maxPixels}`);
        err.name = "TooLarge";
        throw err;
      }
      const t1 = performance.now();
      const { pixels, tensor } = toModelInput(img.rgba, img.width, img.height, model);
      const t2 = performance.now();
      const shape = [1, model.in_chans, model.input_size, model.input_size];
      const out = await session.run({ [session.inputNames[0]]: new this.ort.Tensor("float32", tensor, shape) });
      const raw = Float32Array.from(out[session.outputNames[0]].data);
      const t3 = performance.now();
      return {
        raw,
        unit: l2normalize(raw),
        pixels,
        ms: { decode: t1 - t0, preprocess: t2 - t1, run: t3 - t2, total: t3 - t0 },
      };
    }
  }

  root.CmpnasEmbed = { Runtime, decode, toModelInput, resizeBilinear, vectorBody, toFloat16, l2normalize, pyRound };
})(window);
