#!/usr/bin/env python
"""zoo's single entry point: fit / validate / test / predict (LightningCLI) and compare.

    python train.py fit --config configs/unet.yaml --model.net.norm group
    python train.py compare --config configs/unet.yaml --norms batch,group,instance,none --out reports/unet
"""
from zoo.cli import main

if __name__ == "__main__":
    main()
