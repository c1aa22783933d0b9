"""fedrec core model: data, the SASRec-style user encoder, training, evaluation, recommendation.

Pure PyTorch + numpy; no Flower, no Opacus.
"""
