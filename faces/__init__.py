"""Face detection and alignment: MTCNN's cascade on the CPU, the 5-point similarity warp
to ArcFace's 112x112 template, reduced JPEG decodes, and many files aligned by worker
threads. Used by align_faces.py, lfw_eval.py, megaface.py, ijb_eval.py and demo.py.
"""
