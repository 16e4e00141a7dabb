"""MTIL's task list, orders, class names and prompt templates, as the ZSCL harness defines them.

Source: Thunderbeee/ZSCL `mtil/src/datasets/collections.py` and `cifar10.py` (copied verbatim as
data; the harness writes templates as lambdas, here they are `{}` format strings). Where the harness
takes class names from the torchvision dataset (`classes`, with `_` turned into spaces by its
`process_labels`), `CLASS_NAMES` has no entry and `streams.mtil` does the same on the data on disk;
where it hard-codes a list (Caltech101, EuroSAT, Flowers102), the list is here, index-aligned with
torchvision's label order. Training prompts use the first template only; evaluation averages the
text embeddings of all of them (spec methods.md §1.1).
"""
from __future__ import annotations

# Task names as the stream's manifest spells them (also the keys of a run config's `per_task`).
AIRCRAFT, CALTECH, CIFAR100, DTD, EUROSAT, FLOWERS, FOOD, MNIST, PET, CARS, SUN = (
    "fgvc-aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101", "mnist", "oxford-pet",
    "stanford-cars", "sun397")
CIFAR10 = "cifar10"

# ZSCL.sh:8 (Order I) and ZSCL_minus.sh:8 (Order II; results.ipynb permutation [9,6,7,8,5,10,0,1,3,4,2]).
ORDERS: dict[str, list[str]] = {
    "I": [AIRCRAFT, CALTECH, CIFAR100, DTD, EUROSAT, FLOWERS, FOOD, MNIST, PET, CARS, SUN],
    "II": [CARS, FOOD, MNIST, PET, FLOWERS, SUN, AIRCRAFT, CALTECH, DTD, EUROSAT, CIFAR100],
}
# Zero-shot-only control sets the harness also evaluates (CIFAR10's column is dropped from the metrics).
CONTROLS = [CIFAR10]

# ZSCL.sh:9: 5e-5 for Aircraft and MNIST, 1e-5 for the rest.
LEARNING_RATES = {name: (5e-5 if name in (AIRCRAFT, MNIST) else 1e-5) for name in ORDERS["I"]}

CIFAR_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]

TEMPLATES: dict[str, list[str]] = {
    AIRCRAFT: [
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ],
    CALTECH: [
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ],
    CIFAR100: CIFAR_TEMPLATES,
    CIFAR10: CIFAR_TEMPLATES,
    DTD: [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
    EUROSAT: [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    FLOWERS: ["a photo of a {}, a type of flower."],
    FOOD: ["a photo of a {}, a type of food."],
    MNIST: ['a photo of the number: "{}".'],
    PET: ["a photo of a {}, a type of pet."],
    CARS: [
        "a photo of a {}, a type of car.",
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    SUN: [
        "a photo of a {}.",
        "a photo of the {}.",
    ],
}

# Index i = torchvision's label i: Caltech101's sorted categories without BACKGROUND_Google
# (Faces, Faces_easy, Leopards, Motorbikes, accordion, ...). "head of a  crocodile" has two spaces
# in the harness; kept, since the prompts are what the published numbers were measured with.
CALTECH_CLASSES = [
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel",
    "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon",
    "side of a car", "ceiling fan", "cellphone", "chair", "chandelier", "body of a cougar cat", "face of a cougar cat",
    "crab", "crayfish", "crocodile", "head of a  crocodile", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly",
    "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "head of a flamingo", "garfield",
    "gerenuk", "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline skate",
    "joshua tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus",
    "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion", "sea horse",
    "snoopy (cartoon beagle)", "soccer ball", "stapler", "starfish", "stegosaurus", "stop sign", "strawberry",
    "sunflower", "tick", "trilobite", "umbrella", "watch", "water lilly", "wheelchair", "wild cat", "windsor chair",
    "wrench", "yin and yang symbol",
]

# torchvision's EuroSAT is an ImageFolder over 2750/<class>/: these folders, sorted.
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
EUROSAT_CLASSES = [
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
]

# Label i = imagelabels.mat value i + 1.
FLOWERS_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
]

# Fixed lists; every other task takes torchvision's `classes` with "_" -> " " (the harness's process_labels).
CLASS_NAMES: dict[str, list[str]] = {CALTECH: CALTECH_CLASSES, EUROSAT: EUROSAT_CLASSES, FLOWERS: FLOWERS_CLASSES}


def harness_class_name(name: str) -> str:
    """The harness's `underline_to_space`, applied to class names read from a dataset."""
    return name.replace("_", " ")


__all__ = ["CLASS_NAMES", "CONTROLS", "LEARNING_RATES", "ORDERS", "TEMPLATES", "harness_class_name"]
