"""The enrolled gallery of identify.py: the stored embeddings, identities and index with
their atomic generations (store), the threshold at a false-accept rate (its impostor pairs)
or a false positive identification rate (its images searched as unknown faces) from the
gallery itself (threshold), and the photos it enrols and searches: listing, alignment,
the contact sheet (photos).
"""
