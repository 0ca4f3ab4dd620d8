"""The ResNet18 tutorial's predict flow, kept as the reference `python bench.py --cold-start`
times predict.py against, and whose answers predict.py must give for the tutorial's own
checkpoints. Not used by the project.

    python tests/tutorial_predict.py PICTURE WEIGHTS

What the tutorial does on every call: import torch and torchvision, rebuild the
network, load a bare state dict, ToTensor + Normalize the picture, print the
class and its softmax probability.
"""
import sys
from pathlib import Path

import torch
import torchvision.transforms as transforms
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tutorial_resnet import ResNet18  # noqa: E402  the tutorial's network, with its layer names


def predict_(img, weights):
    data_transform = transforms.Compose([transforms.ToTensor(),
                                         transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    img = torch.unsqueeze(data_transform(img), dim=0)
    model = ResNet18()
    model.load_state_dict(torch.load(weights, map_location='cpu'))
    model.eval()
    classes = {'0': '飞机', '1': '汽车', '2': '鸟', '3': '猫', '4': '鹿', '5': '狗', '6': '青蛙', '7': '马', '8': '船', '9': '卡车'}
    with torch.no_grad():
        output = torch.squeeze(model(img))
    predict = torch.softmax(output, dim=0)
    predict_cla = torch.argmax(predict).numpy()
    return classes[str(predict_cla)], predict[predict_cla].item()


if __name__ == '__main__':
    print(predict_(Image.open(sys.argv[1]).convert("RGB"), sys.argv[2]))
