"""The quality head from head-to-head ratings (`curate quality`): the bigASP recipe.

ratings.py  the ratings table: one judgement per part, undo, CSV import/export, embeddings
pairs.py    which pair the rating page shows next (uncertainty sampling, coverage first)
model.py    pair model, ELO tournament, binning into ranks, rank-head training
fit.py      `curate quality fit`: all of model.py in order, with held-out accuracies
server.py   `curate quality rate`: the local rating page (rate.html)
simulate.py synthetic embeddings with a hidden quality and a noisy simulated rater
"""
