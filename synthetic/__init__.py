"""The demo's synthetic identities: base photos in one face frame, identities blended
from them, LFW-style trees and pairs.txt. Used by demo.py and the tests.
"""
