"""The experiments behind ``lrfree``'s command line (``python -m lrfree``): train a character-level GPT
with no learning rate (``train``), and reproduce the papers' claims at small scale (``reproduce quartic``,
``reproduce lrfree``). Every experiment writes a markdown table, a JSON record and PNG figures to an
output folder; docs/RESULTS.md collects them."""
