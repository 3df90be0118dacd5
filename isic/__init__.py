"""ISIC-format data shared by evaluation, training and the precision check: label files, image
folders and the metrics. Depends on nothing else in the project (numpy only)."""
