"""Stage 4, evaluate: the A/B test of candidate against baseline (``ab``), its statistics
(``stats``) and the figure logged at each look (``plots``)."""
