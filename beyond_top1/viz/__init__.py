"""CircuitsVis views of trajectories, inline in Jupyter and as offline HTML files.

Every renderer returns a :class:`View`: it displays inline in Jupyter (``_repr_html_``) and
``view.save("page.html")`` writes one self-contained HTML file that works offline.

Offline rendering. CircuitsVis' ``RenderedHTML`` carries two versions of a view: ``cdn_src``
imports the JavaScript from unpkg.com (needs the network), ``local_src`` inlines the bundle that
the ``circuitsvis`` wheel ships (``circuitsvis/dist/cdn/iife.js``, ~1.3 MB) and works offline.
CircuitsVis' own ``_repr_html_`` picks between them by trying to reach google.com, so we never
use it. A :class:`View` inlines that same local bundle **once** (as a classic script defining the
global ``CircuitsVis``) and mounts each component with ``CircuitsVis.render(id, Component,
props)``, the call ``local_src`` makes; a page with several components stays ~1.3 MB instead of
1.3 MB per component. Any ``RenderedHTML`` can be added to a view (its ``local_src`` is used).

In a notebook, only the session's first view carries the bundle (:func:`bundle_mode`); later
views use the global it defined. Every component also carries a static copy
(:mod:`beyond_top1.viz.fallback`) that shows where scripts do not run (untrusted notebooks,
GitHub) or the bundle is missing; the script replaces it with the interactive component.

:func:`heatmap` and :func:`diff` are layer × position grids rendered in Python (they show
without JavaScript) with a few kB of script for their menus; they need no CircuitsVis.

Token strings are made readable (:func:`readable_token`: ``↵`` newline, ``⇥`` tab, ``␣`` space in
predicted tokens, ``∅`` empty) and HTML-escaped (CircuitsVis inserts token text as HTML). Long
prompts are windowed: by default the last ``max_tokens`` positions, with a note saying so.
"""

from beyond_top1.viz.heatmap import DEFAULT_HEATMAP_TOKENS, batch_view, diff, heatmap
from beyond_top1.viz.renderers import (
    colored_tokens,
    colored_tokens_multi,
    compare_lenses,
    token_log_probs,
    topk_grid,
    topk_tokens,
    trajectory_view,
)
from beyond_top1.viz.view import (
    DEFAULT_MAX_TOKENS,
    GENERATOR_TAG,
    VIEW_STYLE,
    Component,
    View,
    as_view,
    bundle_mode,
    bundle_script,
    page,
    readable_token,
    side_by_side,
)

__all__ = [
    "DEFAULT_HEATMAP_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "GENERATOR_TAG",
    "Component",
    "VIEW_STYLE",
    "View",
    "as_view",
    "batch_view",
    "bundle_mode",
    "bundle_script",
    "colored_tokens",
    "colored_tokens_multi",
    "compare_lenses",
    "diff",
    "heatmap",
    "page",
    "readable_token",
    "side_by_side",
    "token_log_probs",
    "topk_grid",
    "topk_tokens",
    "trajectory_view",
]
