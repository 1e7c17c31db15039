"""The enrolled gallery of identify.py: the stored embeddings, identities and index with
their atomic generations (store), the threshold at a false-accept rate from the gallery's
own impostor pairs (threshold), and the photos it enrols and searches: listing, alignment,
the contact sheet (photos).
"""
