"""`make demo`: placeholder until the full pipeline lands (issue 6)."""

if __name__ == "__main__":
    print("demo: the end-to-end pipeline is not assembled yet")
