"""torchvision.transforms.functional.crop on PIL images."""


def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))
