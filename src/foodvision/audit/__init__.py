"""``python audit.py``: know a data set before training on it (exact and near duplicates within and across
splits and classes, likely label errors ranked by cleanlab, class balance, sizes, formats and modes).

:mod:`foodvision.audit.tool` is the command; :mod:`~foodvision.audit.neighbours` finds near duplicates without
an N x N matrix; :mod:`~foodvision.audit.features` computes the frozen backbone's pooled features;
:mod:`~foodvision.audit.labels` ranks label issues; :mod:`~foodvision.audit.page` writes ``audit.html``.
"""
