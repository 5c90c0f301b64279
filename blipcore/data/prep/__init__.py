"""Offline preparation of datasets, run by `python -m train data ...`: fetch COCO 2017 (`coco2017`), convert
Flickr8k (`flickr8k`), write WebDataset shards (`shards`), resize a folder (`resized`), plant caption noise
(`noise`), with the download and output-folder machinery they share (`fetch`).

It may import `blipcore.data` (what training reads); the reading side never imports it.
"""
