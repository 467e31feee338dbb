"""What a job reads: calibration and evaluation images, text windows, held-out draws, dense-generated text."""
