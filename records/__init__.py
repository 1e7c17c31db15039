"""The RecordIO training-set format (no mxnet), its index and the identity-folder listing.

Used by pre_process.py (validate, index, pack), data_gen.py and train.py.
"""
