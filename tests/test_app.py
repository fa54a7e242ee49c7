"""The web app (``app.py``): started in a subprocess on a small VIAR, called through ``gradio_client`` and clicked in a
headless browser.

* ``/generate`` gives gen_img.py's image for the same class, seed and settings (pixel for pixel), another seed another
  image, the iterations of the schedule asked for, and schedule B side by side;
* ``/edit`` gives scripts/edit.py's result for the same box; a painted mask of the same region gives the same image;
* bad input (class out of range, a seed that is no whole number, no region, an empty mask, an unreadable upload) is
  one message, and the server keeps answering;
* in Debian's chromium (selenium): a click on Generate shows an image.  Skipped, with the reason, where chromium,
  chromedriver or selenium is missing: ``apt-get install chromium chromium-driver`` and
  ``pip install -r requirements-app.txt``.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_main import run_main

import gen_img
from models import build_vae_var
from models.var import iterations_per_scale
from scripts import edit as edit_cli
from utils.errors import UserError
from utils.zoo import VIAR_MODEL, var_file

gradio_client = pytest.importorskip('gradio_client', reason='gradio_client is not installed: '
                                                            'pip install -r requirements-app.txt')
pytest.importorskip('gradio', reason='gradio is not installed: pip install -r requirements-app.txt')

REPO = Path(__file__).resolve().parents[1]
PNS = (1, 2, 3, 4)
NUM_CLASSES = 3
START_TIMEOUT_S = 180       # import of gradio and the model on a busy 2-core machine, with a wide margin
CALL_TIMEOUT_S = 120


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A VIAR (1 pre + 1 implicit + 1 post block, 3 classes, 64 px) and its tokenizer, random weights with a sharpened
    head (so that classes and seeds draw different tokens), saved as bare state dicts; and a 64 px picture."""
    d = tmp_path_factory.mktemp('app')
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', patch_nums=PNS, V=64, Cvae=8, ch=32, share_quant_resi=4,
                             num_classes=NUM_CLASSES, depth=1, use_implicit=True, pre_depth=1, post_depth=1)
    with torch.no_grad():
        var.head.weight.mul_(50)
    torch.save(var.state_dict(), d / VIAR_MODEL)
    torch.save(vae.state_dict(), d / 'vae.pth')
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), np.uint8)).save(d / 'pic.png')
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255          # the right half: the box 0,0.5,1,1
    Image.fromarray(mask).save(d / 'right_half.png')
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / 'black.png')
    (d / 'broken.png').write_bytes(b'this is not a PNG')
    return d


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(ckpts, tmp_path_factory):
    """``python app.py`` on the small VIAR, on a free loopback port; (url, process, its log file)."""
    port = _free_port()
    log = tmp_path_factory.mktemp('app_log') / 'app.log'
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', GRADIO_ANALYTICS_ENABLED='False',
               PYTHONUNBUFFERED='1', GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp('gradio_tmp')))
    cmd = [sys.executable, 'app.py', '--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'),
           '--device', 'cpu', '--host', '127.0.0.1', '--port', str(port)]
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f'app.py ended with status {proc.returncode}:\n{log.read_text()}')
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()}')
        time.sleep(0.5)
    yield url, proc, log
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


@pytest.fixture(scope='module')
def client(server, tmp_path_factory):
    return gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp('app_client')))


def _call(client, *args, api_name):
    return client.submit(*args, api_name=api_name).result(timeout=CALL_TIMEOUT_S)


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


@pytest.fixture(scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the app runs with OMP_NUM_THREADS=1: the same float results
    yield
    torch.set_num_threads(threads)


def _gen_img(ckpts, out, c, seeds, il, ir, cfg):
    run_main(gen_img.main, ['--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'),
                                     '--class_label', str(c), '--seeds', *map(str, seeds), '--cfg', str(cfg),
                                     '--iter_left', str(il), '--iter_right', str(ir), '--output_dir', str(out),
                                     '--use_implicit', '--device', 'cpu'])
    return {s: _png(out / 'viar' / f'class{c}_seed{s}.png') for s in seeds}


def test_generate_is_gen_img(client, ckpts, tmp_path, one_thread):
    ref = _gen_img(ckpts, tmp_path, 2, [5, 6, 7], 3, 2, 2.5)
    img, img_b, report, plot = _call(client, 2, 5, 2.5, 3, 2, api_name='/generate')     # n_images: 4 (default)
    one = _call(client, 2, 5, 2.5, 3, 2, 1, api_name='/generate')[0]
    np.testing.assert_array_equal(_png(one), ref[5])        # one image: exactly gen_img.py's PNG
    grid = _png(img)        # seeds 5..8 side by side, 2 px white padding (make_grid)
    assert grid.shape == (64 + 4, 4 * 66 + 2, 3)
    for i, s in enumerate([5, 6, 7]):
        np.testing.assert_array_equal(grid[2:66, 2 + 66 * i:66 + 66 * i], ref[s])
    assert not np.array_equal(ref[5], ref[6])               # another seed, another image
    assert img_b is None and plot is not None
    its = ' · '.join(map(str, iterations_per_scale(3, 2, len(PNS))))
    assert 'class 2, seeds 5..8' in report and 'images/s' in report and f'iterations run per scale: {its}' in report


def test_generate_side_by_side(client):
    img, img_b, report, plot = _call(client, 0, 0, 1.5, 10, 10, 2, 900, 0.96, False, 0, '', True, 1, 1, 0, '',
                                     api_name='/generate')
    a, b = _png(img), _png(img_b)
    assert a.shape == b.shape == (68, 2 * 66 + 2, 3)
    assert not np.array_equal(a, b)         # 10 iterations against 1 on a random model: other tokens
    assert '**B** (1->1 iterations)' in report and 'iterations run per scale: 1 · 1 · 1 · 1' in report
    assert _png(plot).shape[0] > 100
    # early exit: the report names the tolerance, and no scale runs more than the schedule's maximum
    report = _call(client, 0, 0, 1.5, 10, 10, 1, 900, 0.96, False, 0.5, api_name='/generate')[2]
    assert 'early exit at residual 0.5' in report


def test_edit_is_scripts_edit(client, ckpts, tmp_path, one_thread):
    rc = edit_cli.main(['--input_img', str(ckpts / 'pic.png'), '--box', '0,0.5,1,1', '--seeds', '3',
                        '--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'),
                        '--iter_left', '4', '--iter_right', '4', '--output_dir', str(tmp_path), '--device', 'cpu',
                        '--use_implicit'])
    assert rc == 0
    ref = _png(tmp_path / 'viar' / 'pic_inpaint_seed3.png')
    pic = gradio_client.handle_file(str(ckpts / 'pic.png'))
    res, orig, masked, report = _call(client, pic, None, '0,0.5,1,1', 'in-paint', 0, 3, 3.0, 4, 4, 1,
                                      api_name='/edit')
    np.testing.assert_array_equal(_png(res), ref)
    np.testing.assert_array_equal(_png(orig), _png(ckpts / 'pic.png'))
    m = _png(masked)
    np.testing.assert_array_equal(m[:, :32], _png(ckpts / 'pic.png')[:, :32])     # the kept half unchanged
    assert not np.array_equal(m[:, 32:], _png(ckpts / 'pic.png')[:, 32:])
    assert 'in-painting: 8 of 16 tokens generated' in report
    # the same region painted as a mask: the same result
    res_mask = _call(client, pic, gradio_client.handle_file(str(ckpts / 'right_half.png')), '', 'in-paint', 0, 3,
                     3.0, 4, 4, 1, api_name='/edit')[0]
    np.testing.assert_array_equal(_png(res_mask), ref)
    # re-drawn as a class: other pixels than the unconditional in-painting, the left half's tokens kept
    res_cls = _call(client, pic, None, '0,0.5,1,1', 're-draw as a class', 1, 3, 3.0, 4, 4, 1, api_name='/edit')
    assert not np.array_equal(_png(res_cls[0]), ref) and 're-drawn as class 1' in res_cls[3]


@pytest.mark.parametrize('args, message', [
    ((3, 0, 1.5, 10, 10), 'class 3 out of range: it must be in 0..2'),
    ((1, 2 ** 70, 1.5, 10, 10), f'seed {2 ** 70} out of range'),
    ((1, 0, 1.5, 10, 10, 1, -3), 'top_k -3 must be >= 0'),
    ((1, 0, 1.5, 10, 10, 1, 900, 0.96, False, 0, '1_2_4'), 'has fixed scales'),    # a FlexVAR schedule for a VIAR
])
def test_generate_bad_input_is_a_message(client, server, args, message):
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        _call(client, *args, api_name='/generate')
    assert message in str(e.value) and 'Traceback' not in str(e.value)
    assert server[1].poll() is None


@pytest.mark.parametrize('image, mask, box, message', [
    ('pic.png', None, '', 'no region to edit'),
    ('pic.png', 'black.png', '', 'the mask is empty'),
    ('pic.png', None, '0.3,0.3,0.35,0.35', 'leaves no token of the 4x4 token grid to generate'),
    ('pic.png', None, '1,2', 'needs four fractions'),
    ('broken.png', None, '0,0,1,1', 'cannot be read as an image'),
    (None, None, '0,0,1,1', 'no image'),
])
def test_edit_bad_input_is_a_message(client, server, ckpts, image, mask, box, message):
    file = lambda name: None if name is None else gradio_client.handle_file(str(ckpts / name))
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        _call(client, file(image), file(mask), box, 'in-paint', 0, 0, 3.0, 2, 2, 1, api_name='/edit')
    assert message in str(e.value) and 'Traceback' not in str(e.value)
    assert server[1].poll() is None
    assert _call(client, 0, 0, 1.5, 1, 1, 1, api_name='/generate')[0] is not None     # still serving


# ================================ a real browser ======================================================================
def _browser():
    """(chromium, chromedriver) paths, or a skip with what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip('selenium is not installed: pip install -r requirements-app.txt')
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not chromium or not driver:
        pytest.skip('no headless browser: install Debian\'s chromium and chromium-driver '
                    '(apt-get install chromium chromium-driver)')
    return chromium, driver


def test_browser_click_generate_shows_an_image(server, tmp_path):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', f'--user-data-dir={tmp_path / "profile"}', '--window-size=1280,1000'):
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        browser.set_page_load_timeout(60)
        browser.get(server[0])
        wait = WebDriverWait(browser, 90)
        button = wait.until(EC.element_to_be_clickable((By.ID, 'generate-btn')))
        assert not browser.find_elements(By.CSS_SELECTOR, '#images-a img')
        button.click()
        img = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '#images-a img')))
        wait.until(lambda b: b.execute_script('return arguments[0].complete && arguments[0].naturalWidth', img))
        assert img.get_attribute('naturalWidth') == str(4 * 66 + 2)       # 4 images of 64 px, 2 px padding
        assert 'images/s' in browser.find_element(By.ID, 'generate-info').text
    finally:
        browser.quit()
    assert server[1].poll() is None


# ================================ in-process: which model, the editor's layers =======================================
def test_demo_output_is_the_default_model(ckpts, tmp_path, monkeypatch):
    """Without a model flag the app serves a finished demo run in --demo_dir (its tokenizer named by report.json, its
    class names and validation images); without one, the published VIAR."""
    import app
    demo = tmp_path / 'demo_output'
    (demo / 'viar').mkdir(parents=True)
    (demo / 'vae').mkdir()
    shutil.copy(ckpts / VIAR_MODEL, demo / 'viar' / 'ar-ckpt-last.pth')
    shutil.copy(ckpts / 'vae.pth', demo / 'vae' / 'vae_ch32v64z8.pth')
    for c in ('a_cls', 'b_cls', 'c_cls'):
        (demo / 'data' / 'val' / c).mkdir(parents=True)
        shutil.copy(ckpts / 'pic.png', demo / 'data' / 'val' / c / '00000.png')
    (demo / 'report.json').write_text('{"data": {"classes": ["a_cls", "b_cls", "c_cls"]}, '
                                      '"tokenizer": {"checkpoint": "/elsewhere/vae/vae_ch32v64z8.pth"}}')
    monkeypatch.chdir(tmp_path)
    engine = app.load_engine(app.get_parser().parse_args(['--device', 'cpu']))
    assert engine.var_ckpt == os.path.join('demo_output', 'viar', 'ar-ckpt-last.pth')
    assert engine.names == ['a_cls', 'b_cls', 'c_cls'] and engine.implicit and len(engine.val_images) == 3
    assert app.choose_checkpoints(app.get_parser().parse_args(['--demo_dir', 'nowhere'])) == (
        f'ckpts/{VIAR_MODEL}', False)
    assert app.choose_checkpoints(app.get_parser().parse_args(['--depth', '16'])) == (f'ckpts/{var_file(16)}', False)


def test_editor_layers_are_the_mask():
    import app
    bg = Image.new('RGBA', (40, 20), (10, 200, 30, 255))
    layer = Image.new('RGBA', (40, 20), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (20, 0, 40, 20))        # the right half painted
    image, mask = app.editor_inputs({'background': bg, 'layers': [layer], 'composite': None})
    assert image.mode == 'RGB' and image.getpixel((0, 0)) == (10, 200, 30)
    m = np.asarray(mask)
    assert m[:, 20:].min() == 255 and m[:, :20].max() == 0
    assert app.editor_inputs({'background': bg, 'layers': [Image.new('RGBA', (40, 20))]})[1] is None   # nothing
    assert app.editor_inputs(None) == (None, None)


@pytest.mark.parametrize('family', ['var', 'flex_implicit'])
def test_other_families(family, tmp_path, one_thread):
    """VAR (no iteration knob: no plot) and an implicit FlexVAR (its schedule, and the iterations) load and generate
    through the same calls; a FlexVAR schedule that is none is one message."""
    import app
    from models import build_flexvar
    torch.manual_seed(0)
    if family == 'var':
        vae, var = build_vae_var(device='cpu', patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=NUM_CLASSES, depth=1)
        torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    else:
        vae, var = build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=NUM_CLASSES, depth=1, patch_nums=PNS,
                                 use_implicit=True, pre_depth=1, post_depth=1)
        torch.save({'model': vae.state_dict()}, tmp_path / 'vae.pth')
    torch.save(var.state_dict(), tmp_path / 'var.pth')
    engine = app.load_engine(app.get_parser().parse_args(['--var_ckpt', str(tmp_path / 'var.pth'), '--vae_ckpt',
                                                          str(tmp_path / 'vae.pth'), '--device', 'cpu']))
    if family == 'var':
        grid, grid_b, report, plot = engine.generate(1, 0, 1.5, 10, 10, 2)
        assert grid.shape == (68, 134, 3) and plot is None and 'VAR (no iteration knob)' in report
        return
    assert engine.flex and engine.implicit
    grid, grid_b, report, plot = engine.generate(1, 0, 1.5, 2, 2, 1, infer_pn='1_2_3_4_5', compare=True,
                                                 iter_left_b=1, iter_right_b=1, infer_pn_b='1_2')
    assert grid.shape == (80, 80, 3) and grid_b.shape == (32, 32, 3)     # 16 px per token-map side
    assert 'scales 1_2_3_4_5' in report and 'iterations run per scale: 2 · 2 · 2 · 2 · 2' in report
    assert plot is not None
    with pytest.raises(app.AppError, match='infer_pn 1_3_2 must be token-map sides'):
        engine.generate(1, 0, 1.5, 2, 2, 1, infer_pn='1_3_2')


def test_pretrained_hub_folder(ckpts, tmp_path, one_thread):
    """--pretrained serves a hub folder (models.save_pretrained), its recorded sampler settings as the page's
    defaults; its images are those of the checkpoint files it was made from."""
    import app
    from models import save_pretrained
    from models.checkpoint import load_vae_var
    from utils.sampler_settings import SamplerSettings
    vae, var = load_vae_var(str(ckpts / 'vae.pth'), str(ckpts / VIAR_MODEL))
    hub = save_pretrained(vae, var, str(tmp_path / 'hub'),
                          sampler=SamplerSettings(cfg=3.0, iter_left=6, iter_right=2).to_dict())
    engine = app.load_engine(app.get_parser().parse_args(['--pretrained', hub, '--device', 'cpu']))
    assert engine.var_ckpt == hub and (engine.defaults.cfg, engine.defaults.iter_left) == (3.0, 6)
    files = app.load_engine(app.get_parser().parse_args(['--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt',
                                                         str(ckpts / 'vae.pth'), '--device', 'cpu']))
    np.testing.assert_array_equal(engine.generate(1, 4, 3.0, 6, 2, 1)[0], files.generate(1, 4, 3.0, 6, 2, 1)[0])
    with pytest.raises(UserError, match='drop --vae_ckpt'):
        app.load_engine(app.get_parser().parse_args(['--pretrained', hub, '--vae_ckpt', str(ckpts / 'vae.pth')]))


def test_no_model_offline_is_one_line(tmp_path):
    """No demo run, no --var_ckpt, the published VIAR not downloaded and no network: one line saying where to get it,
    status 1 (before any server starts)."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', GRADIO_ANALYTICS_ENABLED='False')
    r = subprocess.run([sys.executable, str(REPO / 'app.py'), '--device', 'cpu'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    want = REPO / 'ckpts' / VIAR_MODEL     # run from elsewhere: the repository's ckpts/, not a new <cwd>/ckpts
    assert len(lines) == 1 and lines[0].startswith(f"app.py: error: checkpoint '{want}' is missing"), r.stderr
    assert not (tmp_path / 'ckpts').exists()
    assert 'HF_HUB_OFFLINE' in lines[0] and 'Traceback' not in r.stdout + r.stderr
