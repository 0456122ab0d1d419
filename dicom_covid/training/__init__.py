"""Training: one engine for every network, and what is fitted around it.

* :mod:`~dicom_covid.training.engine`: the epoch loop every network trains on (resume with every
  random generator's state, per-epoch checkpoint, best state, early stop, history, progress),
  used by the classifiers and by :mod:`dicom_covid.lungs.training`;
* :mod:`~dicom_covid.training.train`: :func:`~dicom_covid.training.train.train` and
  :class:`~dicom_covid.training.train.TrainConfig` (recipes, resume, early stopping, DDP, export);
* :mod:`~dicom_covid.training.data`: manifests, seeded subsamples, the cached image dataset;
* :mod:`~dicom_covid.training.metrics`: AUCs, threshold choice, calibration error (also used by
  :mod:`dicom_covid.analysis`);
* :mod:`~dicom_covid.training.crossval`: leave-source-out runs and ablation tables;
* :mod:`~dicom_covid.training.ensemble`: ensembles of bundle models;
* :mod:`~dicom_covid.training.abstention_fit`: abstention thresholds and feature statistics.

Evaluation, reports, comparisons, t-SNE, the shortcut control and the heat-share study are
analysis, in :mod:`dicom_covid.analysis`; nothing here imports it.
"""
