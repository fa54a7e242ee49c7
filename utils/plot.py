"""Small line plots drawn with Pillow alone (no plotting library is a requirement of this repository).

    p = Panel('residual vs iteration', 'iteration', 'relative residual', logy=True)
    p.line([1, 2, 3], [1e-1, 1e-2, 1e-3], label='scale 1', band=([...], [...]))    # band: shaded (low, high)
    save_png([p, other], 'plot.png', title='...')                                   # panels side by side

Axes are linear or log10 with round ticks (1, 2, 5 x 10^k; decades on log axes), a light grid, a legend box, and
optional text next to points.  Points that a log axis cannot show (<= 0) or that are not finite are left out and
break the line.  Used by ``scripts/fixed_point.py``, ``scripts/sweep.py`` and ``app.py``.
"""
import io
import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from utils.misc import atomic_write_bytes

__all__ = ['COLORS', 'Panel', 'render_panels', 'save_png', 'nice_ticks', 'tick_labels']

# matplotlib's tab10 colours
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v == 0:
        return '0'
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        m, e = f'{v:.0e}'.split('e')
        return f'{m}e{int(e)}'
    return f'{v:.10g}' if v == int(v) else f'{v:.3g}'


def tick_labels(ticks: Sequence[float], log: bool) -> List[str]:
    """Labels of a tick row: as many decimals as the step between linear ticks needs (235.5 and 236 stay apart)."""
    if log or len(ticks) < 2 or max(abs(t) for t in ticks) >= 1e5:
        return [_fmt(t) for t in ticks]
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f'{t:.{decimals}f}' for t in ticks]


def nice_ticks(lo: float, hi: float, log: bool, target: int = 6) -> List[float]:
    """Tick values covering [lo, hi]: decades (with 2 and 5 in between when the range is short) on a log axis,
    multiples of 1, 2 or 5 x 10^k on a linear one."""
    if log:
        a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
        step = max(1, math.ceil((b - a) / target))
        ticks = [10.0 ** e for e in range(math.ceil(a / step) * step, b + 1, step)]
        if b - a <= 2:
            ticks = sorted(t * m for t in ticks for m in (1, 2, 5))
        return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)] or [lo, hi]
    span = (hi - lo) or abs(hi) or 1.0
    mag = 10 ** math.floor(math.log10(span / target))
    step = next(m * mag for m in (1, 2, 5, 10) if span / (m * mag) <= target + 1)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _padded_range(values: Sequence[float], log: bool) -> Tuple[float, float]:
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    pad = (hi - lo) * 0.05 or (0.5 if log else max(abs(hi) * 0.1, 0.5))
    lo, hi = lo - pad, hi + pad
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


class Panel:
    """One plot: title, axis labels, linear or log axes, lines, vertical markers and a legend."""

    def __init__(self, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
                 size: Tuple[int, int] = (620, 440), xlim=None, ylim=None, legend: str = 'upper right'):
        self.title, self.xlabel, self.ylabel, self.logx, self.logy = title, xlabel, ylabel, logx, logy
        self.size, self.xlim, self.ylim, self.legend = size, xlim, ylim, legend
        self.series, self.vlines = [], []

    def line(self, xs: Sequence[float], ys: Sequence[float], label: Optional[str] = None, color=None,
             band: Optional[Tuple[Sequence[float], Sequence[float]]] = None, marker: bool = True, width: int = 2,
             texts: Optional[Sequence[str]] = None, dashed: bool = False, xerr: Optional[Sequence[float]] = None,
             yerr: Optional[Sequence[float]] = None) -> 'Panel':
        """A polyline through (xs, ys); ``band``: (low, high) per x, shaded in a light tint; ``texts``: a label next to
        each point; ``xerr``, ``yerr``: error bars of +- that much at each point."""
        color = color or COLORS[len(self.series) % len(COLORS)]
        self.series.append(dict(xs=list(map(float, xs)), ys=list(map(float, ys)), label=label, color=color,
                                band=band, marker=marker, width=width, texts=texts, dashed=dashed,
                                xerr=None if xerr is None else list(map(float, xerr)),
                                yerr=None if yerr is None else list(map(float, yerr))))
        return self

    def vline(self, x: float, label: Optional[str] = None, color=(120, 120, 120)) -> 'Panel':
        self.vlines.append((float(x), label, color))
        return self

    # ---- drawing ----
    def _limits(self):
        xs = [x for s in self.series for x in s['xs']] + [x for x, _, _ in self.vlines]
        ys = [y for s in self.series for y in s['ys']]
        for s in self.series:
            for key, vals, out in (('xerr', s['xs'], xs), ('yerr', s['ys'], ys)):
                if s[key]:
                    out += [v + sign * e for v, e in zip(vals, s[key]) for sign in (-1, 1) if e > 0]
        for s in self.series:
            if s['band']:
                ys += [float(v) for part in s['band'] for v in part]
        return self.xlim or _padded_range(xs, self.logx), self.ylim or _padded_range(ys, self.logy)

    def render(self) -> Image.Image:
        W, H = self.size
        img = Image.new('RGB', (W, H), 'white')
        d = ImageDraw.Draw(img)
        f, fs = _font(13), _font(11)
        left, right, top, bottom = 70, W - 15, 34, H - 50
        (x0, x1), (y0, y1) = self._limits()
        tx = (lambda v: math.log10(v)) if self.logx else (lambda v: v)
        ty = (lambda v: math.log10(v)) if self.logy else (lambda v: v)
        X0, X1, Y0, Y1 = tx(x0), tx(x1), ty(y0), ty(y1)

        def px(x, y):
            return (left + (tx(x) - X0) / (X1 - X0) * (right - left),
                    bottom - (ty(y) - Y0) / (Y1 - Y0) * (bottom - top))

        def visible(x, y):
            return (math.isfinite(x) and math.isfinite(y) and (x > 0 or not self.logx) and (y > 0 or not self.logy))

        # grid and ticks
        xt, yt = nice_ticks(x0, x1, self.logx), nice_ticks(y0, y1, self.logy)
        for t, text in zip(xt, tick_labels(xt, self.logx)):
            X = px(t, y0 if not self.logy else y1)[0]
            d.line((X, top, X, bottom), fill=(232, 232, 232))
            d.text((X, bottom + 4), text, fill='black', font=fs, anchor='ma')
        for t, text in zip(yt, tick_labels(yt, self.logy)):
            Y = px(x0 if not self.logx else x1, t)[1]
            d.line((left, Y, right, Y), fill=(232, 232, 232))
            d.text((left - 5, Y), text, fill='black', font=fs, anchor='rm')
        d.rectangle((left, top, right, bottom), outline='black')
        d.text(((left + right) / 2, 8), self.title, fill='black', font=f, anchor='ma')
        d.text(((left + right) / 2, H - 20), self.xlabel, fill='black', font=f, anchor='ma')
        lab = Image.new('RGB', (bottom - top, 18), 'white')
        ImageDraw.Draw(lab).text(((bottom - top) / 2, 2), self.ylabel, fill='black', font=f, anchor='ma')
        img.paste(lab.rotate(90, expand=True), (4, top))

        # bands first (under every line), then lines, markers, texts and vertical markers
        plot = Image.new('RGBA', (W, H), (0, 0, 0, 0))
        pd = ImageDraw.Draw(plot)
        for s in self.series:
            if s['band']:
                lo, hi = s['band']
                pts = [(x, float(a), float(b)) for x, a, b in zip(s['xs'], lo, hi) if visible(x, float(a))
                       and visible(x, float(b))]
                if len(pts) >= 2:
                    poly = [px(x, b) for x, _, b in pts] + [px(x, a) for x, a, _ in reversed(pts)]
                    pd.polygon(poly, fill=(*s['color'], 48))
        for s in self.series:
            runs, cur = [], []
            for x, y in zip(s['xs'], s['ys']):
                if visible(x, y):
                    cur.append(px(x, y))
                elif cur:
                    runs.append(cur)
                    cur = []
            runs.append(cur)
            for run in runs:
                if len(run) >= 2:
                    if s['dashed']:     # 7 px on, 5 px off along each segment
                        for a, b in zip(run, run[1:]):
                            length = math.dist(a, b)
                            for t in range(0, max(int(length), 1), 12):
                                u, v = t / max(length, 1e-9), min(t + 7, length) / max(length, 1e-9)
                                pd.line((a[0] + (b[0] - a[0]) * u, a[1] + (b[1] - a[1]) * u,
                                         a[0] + (b[0] - a[0]) * v, a[1] + (b[1] - a[1]) * v),
                                        fill=s['color'], width=s['width'])
                    else:
                        pd.line(run, fill=s['color'], width=s['width'], joint='curve')
                for X, Y in run:
                    if s['marker']:
                        pd.ellipse((X - 3, Y - 3, X + 3, Y + 3), fill=s['color'])
            for x, y, ex, ey in zip(s['xs'], s['ys'], s['xerr'] or [0.0] * len(s['xs']),
                                    s['yerr'] or [0.0] * len(s['xs'])):
                for (a, b), horizontal in ((((x - ex, y), (x + ex, y)), True), (((x, y - ey), (x, y + ey)), False)):
                    if a != b and visible(*a) and visible(*b):
                        (Xa, Ya), (Xb, Yb) = px(*a), px(*b)
                        pd.line((Xa, Ya, Xb, Yb), fill=s['color'], width=1)
                        for X, Y in ((Xa, Ya), (Xb, Yb)):      # caps
                            pd.line((X, Y - 3, X, Y + 3) if horizontal else (X - 3, Y, X + 3, Y), fill=s['color'])
            if s['texts']:
                for x, y, t in zip(s['xs'], s['ys'], s['texts']):
                    if t and visible(x, y):
                        X, Y = px(x, y)
                        tw = pd.textlength(t, font=fs)
                        pd.text((X + 5 if X + 5 + tw < right else X - 5 - tw, Y - 14), t, fill=(60, 60, 60), font=fs)
        for x, label, color in self.vlines:
            if visible(x, y0 if not self.logy else y1):
                X = px(x, y0 if not self.logy else y1)[0]
                for Y in range(top, bottom, 8):
                    pd.line((X, Y, X, min(Y + 4, bottom)), fill=color, width=1)
                if label:
                    pd.text((X + 4, top + 4), label, fill=color, font=fs)
        img.paste(plot, (0, 0), plot)

        # legend inside the axes: 'upper right', 'lower right', 'upper left' or 'lower left'
        labelled = [s for s in self.series if s['label']]
        if labelled:
            w = max(d.textlength(s['label'], font=fs) for s in labelled) + 34
            h = 16 * len(labelled) + 6
            bx = right - w - 6 if 'right' in self.legend else left + 6
            by = top + 6 if 'upper' in self.legend else bottom - 6 - h
            d.rectangle((bx, by, bx + w, by + h), fill='white', outline=(150, 150, 150))
            for i, s in enumerate(labelled):
                Y = by + 8 + 16 * i
                d.line((bx + 5, Y, bx + 25, Y), fill=s['color'], width=3)
                d.text((bx + 30, Y), s['label'], fill='black', font=fs, anchor='lm')
        return img


def render_panels(panels: Sequence[Panel], title: Optional[str] = None) -> Image.Image:
    """The panels side by side (and a title above them) as one RGB image."""
    imgs = [p.render() for p in panels]
    head = 24 if title else 0
    out = Image.new('RGB', (sum(i.width for i in imgs), max(i.height for i in imgs) + head), 'white')
    x = 0
    for i in imgs:
        out.paste(i, (x, head))
        x += i.width
    if title:
        ImageDraw.Draw(out).text((out.width / 2, 5), title, fill='black', font=_font(14), anchor='ma')
    return out


def save_png(panels: Sequence[Panel], path, title: Optional[str] = None) -> None:
    """The panels side by side (and a title above them) as one PNG, written atomically."""
    buf = io.BytesIO()
    render_panels(panels, title).save(buf, format='PNG')
    atomic_write_bytes(buf.getvalue(), path)
