"""Evaluation protocols and their file formats: embeddings of aligned crops, k-fold
verification metrics and plots, LFW pairs/images/.bin sets, IJB-B/C release files,
features and report, MegaFace feature files, noise lists and evaluator.
Used by lfw_eval.py, ijb_eval.py, megaface.py and train.py (validation).
"""
