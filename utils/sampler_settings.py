"""One typed description of the sampler's settings: the knobs of ``autoregressive_infer_cfg`` (VAR, VIAR, FlexVAR).

``SamplerSettings`` is what the sampling scripts read from their flags (``utils.sampling_utils.sampler_kwargs``),
what a hub folder stores as its sampling defaults (``to_dict()``, read back by ``utils.model_io``) and what
``sample_folder(..., **sampler)`` takes.  Each field carries its command-line flag, the rule a value must follow
and which models it is for; the flag tables of ``utils.sampling_utils`` (``SAMPLER_FLAGS``, ``ITERATION_KWARGS``,
``FLEX_KWARGS``, the sampler rows of ``FLAG_RULES``) are derived from it.  A new knob is one line: a field with
``knob(...)``.

A field left None is not passed (the model's own default applies).  Application layer: the fixed-point knobs'
values (``ITER_EXITS``, ``ITER_SOLVERS``) are the models' own.
"""
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Tuple

from models.var import ITER_EXITS, ITER_SOLVERS
from utils.flags import FLEX_SCHEDULE_PRESETS, parse_scales, schedule_name

__all__ = ['ANDERSON_KWARGS', 'ITER_EXITS', 'ITER_SOLVERS', 'SOLVER_DEFAULTS', 'SamplerSettings', 'SettingsError',
           'knob', 'schedule_name']


# the values of the VIAR fixed-point knobs that are the paper's sampler: left out of the keywords (the same images,
# folder and recorded settings as without them); the Anderson knobs only matter with the Anderson solver
SOLVER_DEFAULTS = {'iter_exit': 'batch', 'iter_solver': 'picard', 'warm_start': False}
ANDERSON_KWARGS = ('anderson_m', 'anderson_beta')


class SettingsError(ValueError):
    """A sampler setting out of its range; the message names the setting and the rule."""


def _flex_schedule(value) -> Optional[Tuple[int, ...]]:
    """``--infer_pn`` (a preset of ``FLEX_SCHEDULE_PRESETS`` or sides, strictly increasing from 1) as a tuple, or
    None when it is not one."""
    try:
        return parse_scales(value, FLEX_SCHEDULE_PRESETS, from_one=True)
    except ValueError:
        return None


def _at_least(lo):
    return lambda v: v >= lo


def _finite_at_least(lo):
    return lambda v: math.isfinite(v) and v >= lo


def knob(default, rule: Tuple[Callable[[Any], bool], str], flag: Optional[str] = None, kind: str = 'all'):
    """A field of ``SamplerSettings``: ``rule`` = (test of a value, what a valid value is); ``flag``: the
    command-line flag (default: the field's name); ``kind``: 'all', 'iteration' (only changes the pixels of a model
    with an implicit block) or 'flex' (FlexVAR models only; None for the others)."""
    return field(default=default, metadata=dict(rule=rule, flag=flag, kind=kind))


@dataclass
class SamplerSettings:
    """The sampler's settings, with the sampling scripts' defaults (``None``: not passed)."""
    cfg: Optional[float] = knob(1.5, (_finite_at_least(0), 'must be a finite number >= 0 (0: no guidance)'))
    top_k: Optional[int] = knob(900, (_at_least(0), 'must be >= 0 (0: off; more than the vocabulary keeps every '
                                                    'token)'))
    top_p: Optional[float] = knob(0.96, (lambda v: 0 <= v <= 1, 'must be in [0, 1] (0: off)'))
    more_smooth: Optional[bool] = knob(False, (lambda v: True, ''))
    iter_left: Optional[int] = knob(10, (_at_least(0), 'must be >= 0 (implicit iterations at the first scale)'),
                                    kind='iteration')
    iter_right: Optional[int] = knob(10, (_at_least(0), 'must be >= 0 (implicit iterations at the last scale)'),
                                     kind='iteration')
    iter_tol: Optional[float] = knob(None, (_finite_at_least(0), 'must be >= 0 (relative residual that stops the '
                                                                 'iterations of a scale)'), kind='iteration')
    iter_exit: Optional[str] = knob(None, (lambda v: v in ITER_EXITS, "must be 'batch' or 'row'"), kind='iteration')
    iter_solver: Optional[str] = knob(None, (lambda v: v in ITER_SOLVERS, "must be 'picard' or 'anderson'"),
                                      kind='iteration')
    anderson_m: Optional[int] = knob(None, (_at_least(1), 'must be >= 1 (Anderson memory)'), kind='iteration')
    anderson_beta: Optional[float] = knob(None, (lambda v: 0 < v <= 1, 'must be in (0, 1] (Anderson damping)'),
                                          kind='iteration')
    warm_start: Optional[bool] = knob(None, (lambda v: True, ''), kind='iteration')
    infer_patch_nums: Optional[Tuple[int, ...]] = knob(
        None, (lambda v: _flex_schedule(v) is not None, "must be token-map sides, strictly increasing from 1, like "
               "1_2_3_4_5_6_8_10_13_16, or '256' / '512'"), flag='infer_pn', kind='flex')
    max_pn: Optional[int] = knob(None, (_at_least(1), 'must be >= 1 (a token-map side)'), kind='flex')
    used_llamagen_cfg: Optional[bool] = knob(None, (lambda v: True, ''), kind='flex')

    # ---- the tables of the flags --------------------------------------------------------------------------------
    @classmethod
    def flags(cls) -> dict:
        """command-line flag -> field name."""
        return {(f.metadata['flag'] or f.name): f.name for f in fields(cls)}

    @classmethod
    def names_of(cls, kind: str) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata['kind'] == kind)

    @classmethod
    def rules(cls) -> dict:
        """command-line flag -> (test, rule) of the fields that have a rule."""
        return {(f.metadata['flag'] or f.name): f.metadata['rule'] for f in fields(cls) if f.metadata['rule'][1]}

    @classmethod
    def flex_defaults(cls) -> dict:
        """A FlexVAR model's value of each FlexVAR field left None (official eval_c2i.py: --maxpn 16, VAR's guidance
        ramp; the schedule None here: the model's own, ``var.patch_nums``)."""
        return {'infer_patch_nums': None, 'max_pn': 16, 'used_llamagen_cfg': False}

    # ---- building, checking, using ------------------------------------------------------------------------------
    @classmethod
    def from_namespace(cls, args) -> 'SamplerSettings':
        """The settings of parsed flags; a field whose flag the namespace lacks is None (not passed)."""
        return cls(**{name: getattr(args, flag, None) for flag, name in cls.flags().items()})

    @classmethod
    def from_dict(cls, d: dict) -> 'SamplerSettings':
        """From ``asdict`` / a hub config (lists back to tuples); unknown keys raise ``SettingsError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SettingsError(f'unknown sampler setting(s) {", ".join(unknown)} (known: {", ".join(sorted(names))})')
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def problems(self) -> list:
        """``'<flag> <value> <rule>'`` for every field out of its range."""
        bad = []
        for f in fields(self):
            value, (ok, rule) = getattr(self, f.name), f.metadata['rule']
            if value is not None and rule and not ok(value):
                bad.append(f'--{f.metadata["flag"] or f.name} {value} {rule}')
        return bad

    def check(self) -> 'SamplerSettings':
        bad = self.problems()
        if bad:
            raise SettingsError('; '.join(bad))
        return self

    def kwargs(self, var=None) -> dict:
        """The keyword arguments of ``autoregressive_infer_cfg``: fields that are not None (booleans as bool, the
        schedule as a tuple; the fixed-point knobs at the paper's values, ``SOLVER_DEFAULTS``, and the Anderson ones
        without the Anderson solver left out).  With the model: ``top_k`` clamped to its vocabulary; a FlexVAR model
        gets every FlexVAR keyword (``flex_defaults``, its own schedule ``var.patch_nums``); FlexVAR settings for
        another model raise ``SettingsError``."""
        kw = {k: v for k, v in asdict(self).items() if v is not None}
        for name in ('more_smooth', 'used_llamagen_cfg', 'warm_start'):
            if name in kw:
                kw[name] = bool(kw[name])
        for name, default in SOLVER_DEFAULTS.items():
            if kw.get(name) == default:
                del kw[name]
        if kw.get('iter_solver') != 'anderson':
            for name in ANDERSON_KWARGS:
                kw.pop(name, None)
        if 'infer_patch_nums' in kw:
            pns = _flex_schedule(kw['infer_patch_nums'])
            if pns is None:
                raise SettingsError(f'--infer_pn {kw["infer_patch_nums"]} '
                                    f'{self.rules()["infer_pn"][1]}')
            kw['infer_patch_nums'] = pns
        if var is None:
            return kw
        if 'top_k' in kw and kw['top_k'] > 0:
            kw['top_k'] = min(kw['top_k'], var.V)
        from models.flexvar import FlexVAR
        if isinstance(var, FlexVAR):
            for name, default in self.flex_defaults().items():
                kw.setdefault(name, tuple(var.patch_nums) if name == 'infer_patch_nums' else default)
        else:
            given = [f'--{self._flag(n)}' for n in self.names_of('flex') if n in kw]
            if given:
                what = 'is a FlexVAR setting' if len(given) == 1 else 'are FlexVAR settings'
                raise SettingsError(f'{" ".join(given)} {what}, but the model is {var.describe()}, whose scales are '
                                    f'fixed')
        return kw

    @classmethod
    def _flag(cls, name: str) -> str:
        return next(f.metadata['flag'] or f.name for f in fields(cls) if f.name == name)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
