;; task: put a clean mug in coffeemachine
;; Two mugs and a distractor: either mug will do once it is washed in the sink basin.
(define (problem clean_mug)
(:domain alfred)
(:objects
  agent1 - agent
  mug_bar_1 mug_bar_2 spoon_bar_1 - object
  coffeemachine_bar_1 countertop_bar_1 drawer_bar_1 sink_bar_1_bar_sinkbasin - receptacle
  loc_bar_0 loc_bar_1 loc_bar_2 loc_bar_3 loc_bar_4 - location
  MugType SpoonType - otype
  CoffeeMachineType CounterTopType DrawerType SinkBasinType - rtype)
(:init
  (atLocation agent1 loc_bar_0)
  (receptacleAtLocation coffeemachine_bar_1 loc_bar_1)
  (receptacleAtLocation countertop_bar_1 loc_bar_2)
  (receptacleAtLocation drawer_bar_1 loc_bar_3)
  (receptacleAtLocation sink_bar_1_bar_sinkbasin loc_bar_4)
  (receptacleType coffeemachine_bar_1 CoffeeMachineType)
  (receptacleType countertop_bar_1 CounterTopType)
  (receptacleType drawer_bar_1 DrawerType)
  (receptacleType sink_bar_1_bar_sinkbasin SinkBasinType)
  (openable drawer_bar_1)
  (inReceptacle mug_bar_1 countertop_bar_1)
  (inReceptacle spoon_bar_1 countertop_bar_1)
  (inReceptacle mug_bar_2 drawer_bar_1)
  (objectAtLocation mug_bar_1 loc_bar_2)
  (objectAtLocation spoon_bar_1 loc_bar_2)
  (objectAtLocation mug_bar_2 loc_bar_3)
  (objectType mug_bar_1 MugType)
  (objectType mug_bar_2 MugType)
  (objectType spoon_bar_1 SpoonType)
  (pickupable mug_bar_1)
  (pickupable mug_bar_2)
  (pickupable spoon_bar_1)
  (cleanable mug_bar_1)
  (cleanable mug_bar_2)
  (cleanable spoon_bar_1)
  (canContain CoffeeMachineType MugType)
  (canContain CounterTopType MugType)
  (canContain CounterTopType SpoonType)
  (canContain DrawerType MugType)
  (canContain DrawerType SpoonType)
  (canContain SinkBasinType MugType)
  (canContain SinkBasinType SpoonType))
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
  (cleanable ?o) (objectType ?o MugType) (receptacleType ?r CoffeeMachineType) (isClean ?o) (inReceptacle ?o ?r)))))))
