"""Evaluate a batch of samples against a reference batch with the ADM ("OpenAI") evaluation suite.

    python evaluator.py data/VIRTUAL_imagenet256_labeled.npz samples/<sample folder>.npz    # as sampling.py packs it

prints Inception Score, FID, sFID, precision and recall, computed as guided-diffusion's ``evaluations/evaluator.py``
computes them, on numpy 2 / TensorFlow 2.  Both ``.npz`` files hold uint8 images (N, H, W, 3) in ``arr_0``, streamed
batch by batch, and/or precomputed statistics.  Only the feature extraction needs TensorFlow (imported when needed);
the metrics are numpy/scipy functions.  From Python: ``evaluate(ref_npz, sample_npz, ...)`` returns the five numbers.
Bad input ends with one line and exit status 1, checked before TensorFlow is loaded.  The files, the Inception graph
cache and the differences from the ADM suite: docs/sampling_evaluation.md ("The evaluator").
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from utils.errors import UserError, run_cli
from utils.misc import DiskFullError, atomic_write, atomic_write_bytes, npz_member_crc32, read_npy_header

INCEPTION_URL = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb'
INCEPTION_FILENAME = 'classify_image_graph_def.pb'

INPUT_TENSOR = 'ExpandDims:0'         # NHWC float32 in 0..255, any size: the graph resizes
POOL_TENSOR = 'pool_3:0'              # (N, 1, 1, 2048): FID, IS, precision/recall features
SPATIAL_TENSOR = 'mixed_6/conv:0'     # (N, 17, 17, C): the first 7 channels, flattened, are the sFID features
SPATIAL_CHANNELS = 7
LOGITS_OP = 'softmax/logits/MatMul'   # its second input is the pool -> logits weight (IS)

IS_SPLIT_SIZE = 5000
IS_SHUFFLE_SEED = 0
SOFTMAX_BATCH_SIZE = 512
NHOOD_SIZE = 3                        # k of the k-NN radii of precision/recall
PR_BATCH_SIZE = 10000                 # rows/columns of one block of the distance matrix
STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')


PROG = 'evaluator.py'


class EvalError(UserError):
    """A problem with the user's input: reported as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (numpy / scipy only)
# ----------------------------------------------------------------------------------------------------------------------

def feature_statistics(acts):
    """Mean and covariance of (N, D) activations, as the ADM suite computes them (mean keeps the input dtype)."""
    acts = np.asarray(acts)
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def covariance_factor(acts):
    """F with F^T F == np.cov(acts, rowvar=False): the centred float64 activations over sqrt(N - 1).  Kept only when
    N < D, where it lets :func:`trace_sqrt_product` work on an (N, N) matrix instead of a (D, D) one."""
    acts = np.asarray(acts, dtype=np.float64)
    if len(acts) >= acts.shape[1]:
        return None
    return (acts - acts.mean(axis=0)) / np.sqrt(len(acts) - 1)


def _sqrtm(mat):
    """scipy's matrix square root without its log noise, on scipy versions before and after the 1.16 rewrite."""
    import scipy
    import scipy.linalg
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if tuple(int(v) for v in scipy.__version__.split('.')[:2]) < (1, 16):
            return scipy.linalg.sqrtm(mat, disp=False)[0]   # older scipy prints to stdout unless disp=False
        return scipy.linalg.sqrtm(mat)


def trace_sqrt_product(sigma1, sigma2, factor1=None, factor2=None):
    """tr sqrt(S1 S2) of two symmetric positive semi-definite matrices, by symmetric eigendecompositions.

    S1 S2 is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD, so tr sqrt(S1 S2) is the sum of the square roots of
    its eigenvalues (rounding noise below zero clipped).  The same number as the real part of tr sqrtm(S1 S2), without
    the complex Schur form: ~8x faster on 2048 features and free of the imaginary noise sqrtm shows on the singular
    products of covariances estimated from fewer images than features.  Given a factor F of S1 (F^T F == S1, see
    :func:`covariance_factor`) or of S2, the nonzero eigenvalues are those of the small F S_other F^T instead."""
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    factors = [(f, other) for f, other in ((factor1, sigma2), (factor2, sigma1)) if f is not None]
    if factors:
        factor, other = min(factors, key=lambda fo: len(fo[0]))
        inner = factor @ other @ factor.T
    else:
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root1 @ sigma2 @ root1
    eigs = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eigs, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, use_sqrtm=False, factor1=None, factor2=None):
    """Fréchet distance between two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).

    By default tr sqrt(S1 S2) comes from :func:`trace_sqrt_product` (with the covariance factors if given).
    ``use_sqrtm`` takes it as the ADM suite does: scipy's ``sqrtm(S1 S2)``; if that is not finite, both covariances get
    ``eps`` added to their diagonals and it is taken again; the real part is kept (the ADM suite stops on an imaginary
    diagonal above 1e-3; this warns).  Both agree to ~1e-7 relative on the golden batches.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f'statistics of different sizes cannot be compared: mu {mu1.shape} and {mu2.shape}, '
                        f'sigma {sigma1.shape} and {sigma2.shape}')
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):
        raise EvalError('the mean or covariance of the features is not finite (NaN or Inf)')
    diff = mu1 - mu2
    if not use_sqrtm:
        try:
            tr_covmean = trace_sqrt_product(sigma1, sigma2, factor1, factor2)
        except np.linalg.LinAlgError:   # eigh did not converge (never seen in practice): take the ADM route
            use_sqrtm = True
    if use_sqrtm:
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            print(f'warning: sqrtm(sigma1 sigma2) is not finite; adding {eps} to the diagonals', file=sys.stderr)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.max(np.abs(np.diagonal(covmean).imag))
            if imag > 1e-3:
                print(f'warning: sqrtm has an imaginary diagonal component of {imag:.3g}; using its real part',
                      file=sys.stderr)
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs, split_size=IS_SPLIT_SIZE, shuffle_seed=IS_SHUFFLE_SEED):
    """exp(E_x KL(p(y|x) || p(y))), averaged over splits of ``split_size`` rows of the (N, classes) softmax.

    Samples are usually written class by class, which leaves each split with a few classes only and lowers the
    score; the rows are therefore shuffled with a fixed seed first (``shuffle_seed=None`` keeps their order, as the
    ADM suite does).  With a single split the order does not matter and nothing is shuffled, so the number equals
    the ADM suite's bit for bit.
    """
    probs = np.asarray(probs)
    if shuffle_seed is not None and len(probs) > split_size:
        probs = probs[np.random.default_rng(shuffle_seed).permutation(len(probs))]
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def pairwise_sq_distances(u, v):
    """Squared L2 distances (len(u), len(v)): max(|u|^2 - 2 u.v + |v|^2, 0) in float16 (operands rounded to half,
    sums accumulated in float32, each operation's result rounded to half), in float32 if any half result is not
    finite.  Returned as float32.

    This is the ADM suite's formula in numpy.  The evaluator itself uses
    :meth:`InceptionFeatures.pairwise_sq_distances`, the same formula run by TensorFlow as the ADM suite runs it:
    TensorFlow's half-precision sums round differently on some entries, which can move a point across a radius
    (on the golden batches, 5 of 400 reference points)."""
    with np.errstate(over='ignore', invalid='ignore'):   # overflow is what the float32 fallback is for
        u16, v16 = np.asarray(u, np.float32).astype(np.float16), np.asarray(v, np.float32).astype(np.float16)
        norm_u = np.sum(np.square(u16), axis=1, dtype=np.float32).astype(np.float16)[:, None]
        norm_v = np.sum(np.square(v16), axis=1, dtype=np.float32).astype(np.float16)[None, :]
        dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        dist = np.maximum(norm_u - np.float16(2) * dot + norm_v, np.float16(0))
    if np.isfinite(dist).all():
        return dist.astype(np.float32)
    u32, v32 = np.asarray(u, np.float32), np.asarray(v, np.float32)
    norm_u = np.sum(np.square(u32), axis=1)[:, None]
    norm_v = np.sum(np.square(v32), axis=1)[None, :]
    return np.maximum(norm_u - np.float32(2) * (u32 @ v32.T) + norm_v, np.float32(0))


def manifold_radii(features, k=NHOOD_SIZE, batch_size=PR_BATCH_SIZE, distances=pairwise_sq_distances):
    """Each point's squared distance to its k-th nearest neighbour, the point itself counting as the 0-th.

    The distance matrix is walked in (batch_size x batch_size) blocks keeping the k+1 smallest distances per row,
    so memory stays bounded for any number of points."""
    n = len(features)
    if n <= k:
        raise EvalError(f'{n} points cannot have a {k}-th nearest neighbour; precision/recall need at least {k + 1}')
    radii = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, batch_size):
        rows = features[r0:r0 + batch_size]
        nearest = np.empty((len(rows), 0), dtype=np.float32)
        for c0 in range(0, n, batch_size):
            block = np.concatenate([nearest, distances(rows, features[c0:c0 + batch_size])], axis=1)
            keep = min(k + 1, block.shape[1])
            nearest = np.partition(block, keep - 1, axis=1)[:, :keep]
        radii[r0:r0 + len(rows)] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def precision_recall(ref_feats, sample_feats, k=NHOOD_SIZE, batch_size=PR_BATCH_SIZE,
                     distances=pairwise_sq_distances):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii, as in the ADM suite.

    precision: share of samples within the radius of at least one reference point;
    recall: share of reference points within the radius of at least one sample.
    ``distances(u, v)`` gives the squared distance matrix of two blocks of rows."""
    ref_radii = manifold_radii(ref_feats, k, batch_size, distances)
    sample_radii = manifold_radii(sample_feats, k, batch_size, distances)
    ref_covered = np.zeros(len(ref_feats), dtype=bool)
    sample_covered = np.zeros(len(sample_feats), dtype=bool)
    for r0 in range(0, len(ref_feats), batch_size):
        for s0 in range(0, len(sample_feats), batch_size):
            dist = distances(ref_feats[r0:r0 + batch_size], sample_feats[s0:s0 + batch_size])
            sample_covered[s0:s0 + batch_size] |= (dist <= ref_radii[r0:r0 + batch_size, None]).any(axis=0)
            ref_covered[r0:r0 + batch_size] |= (dist <= sample_radii[None, s0:s0 + batch_size]).any(axis=1)
    return float(np.mean(sample_covered)), float(np.mean(ref_covered))


# ----------------------------------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------------------------------

class NpzImages:
    """``arr_0`` of an .npz, read batch by batch from the zip member (stored or deflated), never whole."""

    def __init__(self, path, key='arr_0', what='file'):
        self.path, self.member, self.name = Path(path), key + '.npy', f'{what} {path}'
        with zipfile.ZipFile(self.path) as zf:
            if self.member not in zf.namelist():
                raise EvalError(f'{self.name}: no {key} array in this .npz (it holds: {_npz_keys(zf) or "nothing"})')
            with zf.open(self.member) as f:
                self.shape, dtype = self._read_header(f)
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise EvalError(f'{self.name}: {key} must hold uint8 images of shape (N, H, W, 3); '
                            f'it holds {dtype} of shape {self.shape}')

    def _read_header(self, f):
        try:
            shape, fortran_order, dtype = read_npy_header(f)
        except ValueError as e:
            raise EvalError(f'{self.name}: {self.member} is not a readable .npy array ({e})') from e
        if fortran_order and len(shape) > 1:
            raise EvalError(f'{self.name}: {self.member} is stored in Fortran order; save it C-contiguous')
        return shape, dtype

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        """Yield uint8 arrays of up to ``batch_size`` images, in file order."""
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            self._read_header(f)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                try:
                    data = f.read(count * per_image)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise EvalError(f'{self.name}: {self.member} is damaged near image {start} ({e})') from e
                if len(data) != count * per_image:
                    raise EvalError(f'{self.name}: {self.member} is truncated after about {start} images')
                yield np.frombuffer(data, dtype=np.uint8).reshape((count,) + tuple(self.shape[1:]))


def _npz_keys(zf):
    return ', '.join(n[:-4] for n in zf.namelist() if n.endswith('.npy'))


def open_npz(path, what):
    """Check that ``path`` is a readable .npz; return the names of the arrays it holds."""
    path = Path(path)
    if path.is_dir():
        packed = path.with_name(path.name + '.npz')
        hint = f' ({packed} is one)' if packed.is_file() else ''
        raise EvalError(f'{what} {path} is a directory, not an .npz file: pass an .npz archive whose arr_0 holds '
                        f'the images{hint}')
    if not path.is_file():
        raise EvalError(f'{what} {path} not found')
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith('.npy')}
    except (zipfile.BadZipFile, OSError) as e:
        raise EvalError(f'{what} {path} is not an .npz archive ({e})') from e


def load_arrays(path, keys):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise EvalError(f'{path}: cannot read {", ".join(keys)} ({e})') from e


# ----------------------------------------------------------------------------------------------------------------------
# Inception graph and features (TensorFlow, imported on first use)
# ----------------------------------------------------------------------------------------------------------------------

def default_inception_path():
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'viar'
    return cache / INCEPTION_FILENAME


def download(url, dest):
    """Fetch ``url`` into ``dest`` (through a .part file, so an interrupted download leaves nothing behind)."""
    from tqdm import tqdm
    dest = Path(dest)
    part = dest.with_name(dest.name + '.part')
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, 'wb') as out:
            total = int(resp.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=f'downloading {dest.name}') as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        part.replace(dest)
    except (OSError, ValueError) as e:   # URLError, HTTPError, timeouts and disk errors are OSErrors
        part.unlink(missing_ok=True)
        raise EvalError(f'cannot download the Inception graph from {url} ({getattr(e, "reason", e)}); '
                        f'download it yourself and save it as {dest}, or pass --inception PATH') from e


def resolve_inception(path=None):
    """``--inception`` if given, else the cached copy, else a fresh download into the cache."""
    if path is not None:
        if Path(path).is_dir():
            raise EvalError(f'Inception graph {path} is a directory: pass the {INCEPTION_FILENAME} file itself')
        if not Path(path).is_file():
            raise EvalError(f'Inception graph {path} not found (omit --inception to use or download '
                            f'{INCEPTION_URL})')
        return Path(path)
    cached = default_inception_path()
    if not cached.is_file():
        print(f'Inception graph not in the cache; downloading it to {cached}', file=sys.stderr)
        download(INCEPTION_URL, cached)
    return cached


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tf_sq_distances(tf, u, v):
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


def session_config(tf1):
    """The ADM suite's session options: GPU memory taken as needed instead of all at once, and ops without a GPU
    kernel placed on the CPU."""
    config = tf1.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    return config


class InceptionFeatures:
    """The Inception graph in a TF1-style session: images -> (pool, spatial) features, pool features -> softmax,
    and the ADM suite's squared-distance block for precision/recall."""

    def __init__(self, graph_path):
        os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
        import tensorflow as tf
        tf.get_logger().setLevel('ERROR')
        tf1 = tf.compat.v1

        graph_def = tf1.GraphDef()
        try:
            graph_def.ParseFromString(Path(graph_path).read_bytes())
        except Exception as e:
            raise EvalError(f'{graph_path} is not a TensorFlow GraphDef ({e})') from e
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf1.placeholder(tf.float32, shape=[None, None, None, 3])
            try:
                pool, spatial, logits_op = tf.import_graph_def(
                    graph_def, input_map={INPUT_TENSOR: self.images},
                    return_elements=[POOL_TENSOR, SPATIAL_TENSOR, LOGITS_OP], name='inception')
            except (ValueError, KeyError) as e:
                raise EvalError(f'{graph_path} does not look like the Inception graph '
                                f'({str(e).splitlines()[0]})') from e
            self.pool = tf.reshape(pool, [tf.shape(pool)[0], -1])
            self.spatial = tf.reshape(spatial[..., :SPATIAL_CHANNELS], [tf.shape(spatial)[0], -1])
            self.pool_input = tf1.placeholder(tf.float32, shape=[None, None])
            self.softmax = tf.nn.softmax(tf.matmul(self.pool_input, logits_op.inputs[1]))

            self.rows = tf1.placeholder(tf.float32, shape=[None, None])
            self.cols = tf1.placeholder(tf.float32, shape=[None, None])
            self.dist16 = _tf_sq_distances(tf, tf.cast(self.rows, tf.float16), tf.cast(self.cols, tf.float16))
            self.dist32 = _tf_sq_distances(tf, self.rows, self.cols)
        self.session = tf1.Session(graph=self.graph, config=session_config(tf1))

    def activations(self, images, batch_size, desc):
        """(pool, spatial) float32 features of every image of an :class:`NpzImages`."""
        from tqdm import tqdm
        pools, spatials = [], []
        with tqdm(total=len(images), unit='img', desc=desc) as bar:
            for batch in images.batches(batch_size):
                pool, spatial = self.session.run([self.pool, self.spatial],
                                                 {self.images: batch.astype(np.float32)})
                pools.append(pool)
                spatials.append(spatial)
                bar.update(len(batch))
        return np.concatenate(pools), np.concatenate(spatials)

    def pairwise_sq_distances(self, u, v):
        """:func:`pairwise_sq_distances` computed by TensorFlow, as the ADM suite computes it (half, else float32)."""
        feed = {self.rows: u, self.cols: v}
        dist = self.session.run(self.dist16, feed)
        if np.isfinite(dist).all():
            return dist.astype(np.float32)
        return self.session.run(self.dist32, feed)

    def class_probs(self, pool):
        return np.concatenate([self.session.run(self.softmax, {self.pool_input: pool[i:i + SOFTMAX_BATCH_SIZE]})
                               for i in range(0, len(pool), SOFTMAX_BATCH_SIZE)])


# ----------------------------------------------------------------------------------------------------------------------
# One batch file -> pool activations and FID / sFID statistics
# ----------------------------------------------------------------------------------------------------------------------

def stats_cache_path(ref_path):
    ref_path = Path(ref_path)
    return ref_path.with_name(ref_path.stem + '_stats.npz')


class BatchFile:
    """One input .npz, checked when opened: what it stores, and its images where something must be computed.

    Stored ``mu, sigma, mu_s, sigma_s`` are used as they are (the ADM suite does the same), stored ``pool``
    activations likewise; whatever is missing is computed from ``arr_0``."""

    def __init__(self, path, what):
        self.path, self.what = Path(path), what
        self.keys = open_npz(path, what)
        self.has_stats, self.has_pool = set(STAT_KEYS) <= self.keys, 'pool' in self.keys
        self.images = None
        if not (self.has_stats and self.has_pool):
            if 'arr_0' not in self.keys:
                raise EvalError(f'{what} {path}: no arr_0 array in this .npz '
                                f'(it holds: {", ".join(sorted(self.keys)) or "nothing"})')
            self.images = NpzImages(path, what=what)   # checks dtype and shape
            check_count(len(self.images), path, what)

    def cached(self, graph_sha):
        """The ``*_stats.npz`` written next to this file by ``--save_ref_stats``, if it was made from this file
        (same size and CRC-32 of ``arr_0``) with this Inception graph and nothing has to be computed here; else this
        file itself."""
        cache = stats_cache_path(self.path)
        if self.images is None or not cache.is_file():
            return self
        keys = open_npz(cache, 'statistics cache')
        if not {'source_bytes', 'source_crc32', 'graph_sha256'} <= keys:
            print(f'ignoring {cache}: not a statistics cache written by this evaluator', file=sys.stderr)
            return self
        meta = load_arrays(cache, ['source_bytes', 'source_crc32', 'graph_sha256'])
        if (int(meta['source_bytes']) != self.path.stat().st_size
                or int(meta['source_crc32']) != npz_member_crc32(self.path)
                or str(meta['graph_sha256']) != graph_sha):
            print(f'ignoring {cache}: made from another file or Inception graph', file=sys.stderr)
            return self
        print(f'using the cached statistics {cache}', file=sys.stderr)
        return BatchFile(cache, self.what)

    def read(self, model, batch_size, graph_sha):
        """Pool activations (N, D), the FID / sFID statistics {mu, sigma, mu_s, sigma_s} and, where those were
        computed here from fewer images than features, covariance factors {sigma, sigma_s} (else None)."""
        if 'graph_sha256' in self.keys and str(load_arrays(self.path, ['graph_sha256'])['graph_sha256']) != graph_sha:
            print(f'warning: the activations in {self.path} come from another Inception graph', file=sys.stderr)
        stats = load_arrays(self.path, STAT_KEYS) if self.has_stats else None
        if self.images is not None:
            pool, spatial = model.activations(self.images, batch_size, desc=self.what)
            check_finite(pool, self.path, self.what)
            check_finite(spatial, self.path, self.what)
            factors = {'sigma': None, 'sigma_s': None}
            if stats is None:
                stats = dict(zip(STAT_KEYS, feature_statistics(pool) + feature_statistics(spatial)))
                factors = {'sigma': covariance_factor(pool), 'sigma_s': covariance_factor(spatial)}
            return pool, stats, factors
        pool = load_arrays(self.path, ['pool'])['pool']
        if pool.ndim != 2:
            raise EvalError(f'{self.what} {self.path}: pool must be (N, features), got shape {pool.shape}')
        check_count(len(pool), self.path, self.what)
        check_finite(pool, self.path, self.what)
        return pool, stats, {'sigma': None, 'sigma_s': None}


def check_count(n, path, what):
    if n <= NHOOD_SIZE:
        raise EvalError(f'{what} {path} holds {n} images; precision/recall need at least {NHOOD_SIZE + 1} '
                        f'({NHOOD_SIZE}-nearest-neighbour radii)')


def check_finite(acts, path, what):
    if not np.isfinite(acts).all():
        raise EvalError(f'{what} {path}: the Inception features are not finite (NaN or Inf); '
                        f'check the images and the Inception graph')


def save_stats(path, pool, stats, source, graph_sha):
    """Write pool activations, statistics and what they were made from to ``path`` (atomically: temp file, then
    rename).  A file that cannot be written (a full disk included: one line) is a warning, not an error: the
    evaluation goes on."""
    path = Path(path)
    if not path.parent.is_dir():
        print(f'warning: cannot save the reference statistics to {path} (the folder {path.parent} does not exist); '
              f'continuing without', file=sys.stderr)
        return False
    meta = dict(source_bytes=np.int64(Path(source).stat().st_size), source_crc32=np.int64(npz_member_crc32(source)),
                graph_sha256=np.array(graph_sha))
    try:
        atomic_write(lambda f: np.savez(f, pool=pool, **meta, **stats), path)
    except (OSError, DiskFullError) as e:
        print(f'warning: cannot save the reference statistics to {path} ({e}); continuing without', file=sys.stderr)
        return False
    print(f'saved reference statistics and activations to {path}', file=sys.stderr)
    return True


def check_writable(path, flag):
    """An output file (``--json``, ``--save_ref_stats``'s) that cannot be written is refused before anything is
    computed: its folder must exist and take a new file, and the path must not be a folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path('.')
    if path.is_dir():
        raise EvalError(f'{flag} {path} is a folder: pass a file path')
    if not folder.is_dir():
        raise EvalError(f'{flag} {path}: the folder {folder} does not exist')
    try:
        atomic_write_bytes(b'', folder / f'.{path.name}.writable', fsync=False)
        (folder / f'.{path.name}.writable').unlink()
    except (OSError, DiskFullError) as e:
        raise EvalError(f'{flag} {path} cannot be written ({e}); fix that before the Inception pass') from e


def import_tensorflow():
    """TensorFlow, imported before anything is computed or downloaded; missing, one line naming what to install."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    try:
        import tensorflow as tf
    except ImportError as e:
        raise EvalError(f'TensorFlow is needed for the Inception features but cannot be imported ({e}): '
                        f'pip install -r requirements-eval.txt') from e
    return tf


# ----------------------------------------------------------------------------------------------------------------------

def evaluate(ref_npz, sample_npz=None, *, inception=None, batch_size=64, save_ref_stats=False, is_shuffle=True,
             sqrtm=False):
    """The five numbers of ``sample_npz`` against ``ref_npz`` as an ordered dict ``{'Inception Score', 'FID',
    'sFID', 'Precision', 'Recall'}``: the library form of ``python evaluator.py REF SAMPLE``.  ``inception``: the
    graph's path (default: the cache, downloaded there if missing); ``save_ref_stats``: cache the reference
    statistics next to it; ``is_shuffle`` / ``sqrtm``: see ``--no_is_shuffle`` / ``--sqrtm``.  Bad input raises
    ``EvalError`` (checked before TensorFlow loads).  The parsed flags of the script are accepted too:
    ``evaluate(args)``."""
    if isinstance(ref_npz, argparse.Namespace):
        a = ref_npz
        return evaluate(a.ref_batch, a.sample_batch, inception=a.inception, batch_size=a.batch_size,
                        save_ref_stats=a.save_ref_stats, is_shuffle=not a.no_is_shuffle, sqrtm=a.sqrtm)
    if batch_size < 1:
        raise EvalError(f'--batch_size must be positive, got {batch_size}')
    # Check both files before loading TensorFlow, downloading or computing anything.
    ref = BatchFile(ref_npz, 'reference batch')
    sample = BatchFile(sample_npz, 'sample batch')
    if save_ref_stats:
        check_writable(stats_cache_path(ref_npz), '--save_ref_stats')
    if inception is not None:
        resolve_inception(inception)            # a wrong --inception path is its own line
    import_tensorflow()                         # before any download or computation
    graph = resolve_inception(inception)
    graph_sha = file_sha256(graph)
    ref = ref.cached(graph_sha)
    model = InceptionFeatures(graph)

    ref_pool, ref_stats, ref_factors = ref.read(model, batch_size, graph_sha)
    if save_ref_stats and ref.images is not None:
        save_stats(stats_cache_path(ref_npz), ref_pool, ref_stats, ref_npz, graph_sha)
    sample_pool, sample_stats, sample_factors = sample.read(model, batch_size, graph_sha)
    if ref_pool.shape[1] != sample_pool.shape[1]:
        raise EvalError(f'reference and sample features differ in size ({ref_pool.shape[1]} vs '
                        f'{sample_pool.shape[1]}); were they made with the same Inception graph?')

    probs = model.class_probs(sample_pool)
    precision, recall = precision_recall(ref_pool, sample_pool, distances=model.pairwise_sq_distances)
    distances = {}
    for name, mu, sigma in (('FID', 'mu', 'sigma'), ('sFID', 'mu_s', 'sigma_s')):
        try:
            distances[name] = frechet_distance(sample_stats[mu], sample_stats[sigma], ref_stats[mu], ref_stats[sigma],
                                               use_sqrtm=sqrtm, factor1=sample_factors[sigma],
                                               factor2=ref_factors[sigma])
        except EvalError as e:
            raise EvalError(f'{name} of {sample_npz} against {ref_npz}: {e}') from e
    return {
        'Inception Score': inception_score(probs, shuffle_seed=IS_SHUFFLE_SEED if is_shuffle else None),
        'FID': distances['FID'],
        'sFID': distances['sFID'],
        'Precision': precision,
        'Recall': recall,
    }


def report(args):
    """Evaluate, print the five lines, optionally write them as JSON; returns the numbers."""
    if args.json:
        check_writable(args.json, '--json')     # before anything is computed
    results = evaluate(args)
    for name, value in results.items():
        print(f'{name}: {value}')
    if args.json:
        record = dict(results, ref_batch=str(args.ref_batch), sample_batch=str(args.sample_batch),
                      is_shuffle_seed=None if args.no_is_shuffle else IS_SHUFFLE_SEED, fid_sqrtm=args.sqrtm)
        try:
            atomic_write_bytes((json.dumps(record, indent=1) + '\n').encode(), args.json)
        except (OSError, DiskFullError) as e:
            raise EvalError(f'cannot write --json {args.json} ({e}); the numbers are printed above') from e
    return results


def main(argv=None) -> int:
    """``python evaluator.py ARGV``: :func:`report`; the exit status (1 after one error line)."""
    return run_cli(lambda: report(get_parser().parse_args(argv)), PROG, interrupted='interrupted')


def get_parser():
    parser = argparse.ArgumentParser(description='FID, sFID, Inception Score, precision and recall of a sample '
                                                 'batch against a reference batch (ADM evaluation suite).')
    parser.add_argument('ref_batch', help='reference .npz: arr_0 uint8 (N, H, W, 3) and/or mu, sigma, mu_s, sigma_s')
    parser.add_argument('sample_batch', help='sample .npz: arr_0 uint8 (N, H, W, 3)')
    parser.add_argument('--inception', default=None,
                        help=f'path of {INCEPTION_FILENAME} (default: the cache, downloaded there if missing)')
    parser.add_argument('--batch_size', type=int, default=64, help='images per Inception forward pass')
    parser.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    parser.add_argument('--save_ref_stats', action='store_true',
                        help='save the reference statistics and pool activations to REF_stats.npz; '
                             'later runs with the same REF use them instead of recomputing')
    parser.add_argument('--no_is_shuffle', action='store_true',
                        help='split the samples for the Inception Score in file order, as the ADM suite does '
                             '(biased when the samples are written class by class)')
    parser.add_argument('--sqrtm', action='store_true',
                        help='take tr sqrt(S1 S2) of FID/sFID with scipy.linalg.sqrtm as the ADM suite does '
                             '(several times slower; the same number to ~1e-7 relative)')
    return parser


if __name__ == '__main__':
    raise SystemExit(main())
